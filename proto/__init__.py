"""The router/shard contract: generate.proto and its generated stubs.

Regenerate the stubs with `make proto` after editing generate.proto; a test
fails when the committed stubs are stale.
"""
