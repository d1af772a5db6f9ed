"""The model's tokenizer, run in a thread pool so the event loop never blocks.

The router tokenizes each prompt once, during validation, and sends the ids
to the shards. The fast (Rust) tokenizer from `tokenizer.json` is used; it
releases the GIL while encoding, so `validation_workers` threads really run
in parallel. Without a `tokenizer.json`, transformers' tokenizer is used
through one worker (as TGI does for Python tokenizers).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass
class Encoding:
    ids: list[int]
    offsets: list[tuple[int, int]]


class _FastBackend:
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(path)

    def encode(self, text: str, add_special_tokens: bool) -> Encoding:
        enc = self.tok.encode(text, add_special_tokens=add_special_tokens)
        return Encoding(list(enc.ids), [tuple(o) for o in enc.offsets])

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
        if os.path.exists(fast):
            self.backend = _FastBackend(fast)
        else:
            self.backend = _TransformersBackend(directory)
            workers = 1
        self.workers = max(1, workers)
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="tokenizer")

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run any CPU-bound helper (tokenizing, grammar compilation) on the pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return await self.run(self.backend.encode, text, add_special_tokens)

    def encode_sync(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return self.backend.encode(text, add_special_tokens)

    async def decode(self, ids: list[int]) -> str:
        return await self.run(self.backend.decode, ids)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
