"""Paged KV cache: preallocated per-layer K/V block pools and the free list that hands blocks out.

Sequences own block tables, not contiguous buffers, so memory is never
fragmented and a finished sequence's blocks return to the pool at once.
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK_SIZE = 16


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks for the request; nothing was allocated."""


class BlockAllocator:
    """Free list of block ids; allocation is all-or-nothing."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # Popping from the end hands out low ids first (deterministic on every rank).
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} of {self.num_blocks} free")
        if n <= 0:
            return []
        blocks = self._free[-n:][::-1]
        del self._free[-n:]
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """Per layer K and V tensors `[num_blocks, block_size, kv_heads, head_dim]` plus their allocator."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        block_size: int = DEFAULT_BLOCK_SIZE,
        spare_block: bool = False,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # One block beyond the allocator's, owned by no sequence: padding rows of fixed-shape steps
        # (CUDA graphs) write their keys and values there.
        self.scratch_block: int | None = num_blocks if spare_block else None
        shape = (num_blocks + int(spare_block), block_size, kv_heads, head_dim)
        # Zeros, not empty: padded gathers read unused slots, and NaN garbage times a zero weight is NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int) -> int:
        """Bytes one block costs across all layers, K and V."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * num_layers * block_size * kv_heads * head_dim * itemsize

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int, num_blocks_held: int) -> int:
        """Extra blocks a sequence holding `num_blocks_held` needs to store `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - num_blocks_held)

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `layer` viewed as `[blocks * block_size, kv_heads, head_dim]` slots (spare block included)."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, self.kv_heads, self.head_dim), v.view(-1, self.kv_heads, self.head_dim)
