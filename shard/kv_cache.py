"""Paged KV cache: preallocated per-layer K/V block pools and the free list that hands blocks out.

Sequences own block tables, not contiguous buffers, so memory is never
fragmented and a finished sequence's blocks return to the pool at once.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

DEFAULT_BLOCK_SIZE = 16


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks for the request; nothing was allocated."""


class BlockAllocator:
    """Free list of block ids, with reference counts and a prefix table; allocation is all-or-nothing.

    Without prefix caching a block has one user and goes back to the free list when it leaves. With
    it, a full block can be *registered* under its name (`ember.prefix`): later sequences `lookup`
    the name and share the block (its count goes up); when its last user leaves, a registered block
    stays cached, idle, and is evicted least recently used first, only when the free list runs dry.
    Everything here is deterministic, so every tensor-parallel rank makes the same choices.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # Popping from the end hands out low ids first (deterministic on every rank).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._by_name: dict[bytes, int] = {}
        self._name_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered, unused; least recently used first

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and idle cached ones (evicted on demand)."""
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        """Blocks registered under a name (in use or idle)."""
        return len(self._by_name)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} KV blocks, {self.num_free} of {self.num_blocks} free")
        if n <= 0:
            return []
        take = min(n, len(self._free))
        blocks = self._free[len(self._free) - take :][::-1]
        del self._free[len(self._free) - take :]
        while len(blocks) < n:  # evict: the least recently used idle block loses its name
            block, _ = self._idle.popitem(last=False)
            del self._by_name[self._name_of.pop(block)]
            blocks.append(block)
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """One user of each block leaves. Last blocks first, so a sequence's tail is evicted before its head."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] > 0:
                continue
            if b in self._name_of:
                self._idle[b] = None
            else:
                self._free.append(b)

    def lookup(self, name: bytes) -> int | None:
        """The cached block of that name, now with one more user; None when none is cached."""
        block = self._by_name.get(name)
        if block is not None:
            self._take(block)
        return block

    def register(self, block: int, name: bytes) -> int:
        """Name a full block its holder has written. If another block already has the name (the same
        tokens computed twice), the holder takes that one instead and `block` is freed: the block to use."""
        existing = self._by_name.get(name)
        if existing is None:
            self._by_name[name] = block
            self._name_of[block] = name
            return block
        if existing != block:
            self._take(existing)
            self.free([block])
        return existing

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._idle[block]
        self._refs[block] += 1


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
