"""The model's tokenizer, run in a thread pool so the event loop never blocks.

The router tokenizes each prompt once, during validation, and sends the ids
to the shards. The fast (Rust) tokenizer from `tokenizer.json` is used; it
releases the GIL while encoding, so `validation_workers` threads really run
in parallel. Short texts (up to `INLINE_CHARS`) are encoded on the event loop
itself: the hop to a worker thread and back costs more than their encoding
(measured on SmolLM2's tokenizer, a 400-character prompt: 87 µs of CPU inline,
192 µs through the pool), and the longest such text holds the loop for about
0.2 ms. Without a `tokenizer.json`, transformers' tokenizer is used through
one worker (as TGI does for Python tokenizers).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# Texts up to this many characters are encoded on the event loop (fast tokenizer only).
INLINE_CHARS = 1024


class Encoding:
    """Token ids and each token's (start, stop) characters in the text; the offsets are built
    when first read (only /tokenize reads them)."""

    __slots__ = ("ids", "_offsets", "_raw")

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]] | None = None, raw=None) -> None:
        self.ids = ids
        self._offsets = offsets
        self._raw = raw

    @property
    def offsets(self) -> list[tuple[int, int]]:
        if self._offsets is None:
            self._offsets = [tuple(o) for o in self._raw.offsets] if self._raw is not None else []
            self._raw = None
        return self._offsets


class _FastBackend:
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(path)

    def encode(self, text: str, add_special_tokens: bool) -> Encoding:
        enc = self.tok.encode(text, add_special_tokens=add_special_tokens)
        return Encoding(enc.ids, raw=enc)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class _TransformersBackend:
    def __init__(self, directory: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)

    def encode(self, text: str, add_special_tokens: bool) -> Encoding:
        try:
            enc = self.tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            offsets = [tuple(o) for o in enc["offset_mapping"]]
        except NotImplementedError:
            enc = self.tok(text, add_special_tokens=add_special_tokens)
            offsets = [(0, 0)] * len(enc["input_ids"])
        return Encoding(list(enc["input_ids"]), offsets)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class TokenizerPool:
    """Encode/decode off the event loop with `workers` threads."""

    def __init__(self, directory: str, workers: int = 2) -> None:
        fast = os.path.join(directory, "tokenizer.json")
        self.inline_chars = 0
        if os.path.exists(fast):
            self.backend = _FastBackend(fast)
            self.inline_chars = INLINE_CHARS
        else:
            self.backend = _TransformersBackend(directory)
            workers = 1
        self.workers = max(1, workers)
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="tokenizer")

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run any CPU-bound helper (tokenizing, grammar compilation) on the pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        if len(text) <= self.inline_chars:
            return self.backend.encode(text, add_special_tokens)
        return await self.run(self.backend.encode, text, add_special_tokens)

    def encode_sync(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return self.backend.encode(text, add_special_tokens)

    async def decode(self, ids: list[int]) -> str:
        return await self.run(self.backend.decode, ids)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
