"""Launcher: flags, model fetch and conversion, process supervision, shard groups and their control service."""
