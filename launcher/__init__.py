"""Launcher: flags, model fetch and conversion, process supervision."""
