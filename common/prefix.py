"""Prefix blocks named by their contents: the key a KV block is cached under.

A full block of `block_size` tokens is named by a hash chain: its digest covers its own tokens and
the digest of the block before it, so equal names mean equal tokens *and* equal everything before
them — the condition for two sequences to share the block's keys and values. The shard keys its
prefix cache by these names; the router names prompts the same way to count shared blocks once when
it admits requests.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT = b""


def chain(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a block holding `tokens` after the block named `parent` (ROOT for the first)."""
    data = array("q", tokens).tobytes()
    return hashlib.blake2b(parent + data, digest_size=16).digest()


def extend(names: list[bytes], token_ids: Sequence[int], block_size: int, upto: int) -> list[bytes]:
    """Name the full blocks of `token_ids` up to block `upto` (exclusive), after the `names` already
    there; returns `names`, extended in place."""
    upto = min(upto, len(token_ids) // block_size)
    while len(names) < upto:
        i = len(names)
        names.append(chain(names[-1] if names else ROOT, token_ids[i * block_size : (i + 1) * block_size]))
    return names


def shareable_blocks(num_tokens: int, block_size: int) -> int:
    """How many leading full blocks of a prompt of `num_tokens` can come from the cache: all but what
    holds its last token, which is always computed (its logits choose the first new token)."""
    return max(0, num_tokens - 1) // block_size
