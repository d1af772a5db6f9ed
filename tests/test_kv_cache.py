"""Block allocator, paged cache layout, and the per-step attention indices built from block tables."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.shard.attention import AttentionMetadata, paged_attention
from ember.shard.kv_cache import BlockAllocator, OutOfBlocks, PagedKVCache


def test_allocator_hands_out_distinct_blocks_and_takes_them_back():
    alloc = BlockAllocator(8)
    a = alloc.allocate(3)
    b = alloc.allocate(5)
    assert alloc.num_free == 0
    assert sorted(a + b) == list(range(8))
    alloc.free(a)
    assert alloc.num_free == 3
    assert sorted(alloc.allocate(3)) == sorted(a)


def test_allocator_is_all_or_nothing():
    alloc = BlockAllocator(4)
    alloc.allocate(3)
    with pytest.raises(OutOfBlocks, match="need 2 KV blocks, 1 of 4 free"):
        alloc.allocate(2)
    assert alloc.num_free == 1
    assert alloc.allocate(0) == []


def test_cache_layout_and_bytes():
    cache = PagedKVCache(num_layers=3, num_blocks=5, kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    assert cache.k[0].shape == (5, 16, 2, 8) and len(cache.v) == 3
    assert cache.capacity_tokens == 80
    assert PagedKVCache.bytes_per_block(3, 2, 8, torch.float32, 16) == 2 * 3 * 16 * 2 * 8 * 4
    assert cache.blocks_needed(17, 0) == 2 and cache.blocks_needed(32, 2) == 0 and cache.blocks_needed(33, 2) == 1
    k_flat, _ = cache.flat(1)
    k_flat[16 * 3 + 4] = 1.0  # slot 4 of block 3
    assert cache.k[1][3, 4].eq(1.0).all() and cache.k[1].sum() == 16


def test_slots_follow_block_tables():
    meta = AttentionMetadata.build([0, 15], [3, 2], [[7], [2, 5]], block_size=16, device=torch.device("cpu"))
    assert meta.positions.tolist() == [0, 1, 2, 15, 16]
    assert meta.slots.tolist() == [7 * 16, 7 * 16 + 1, 7 * 16 + 2, 2 * 16 + 15, 5 * 16 + 0]
    assert not meta.is_decode
    assert meta.spans[1].ctx_slots.tolist() == [2 * 16 + j for j in range(16)] + [80]


def test_decode_mask_respects_context_and_window():
    meta = AttentionMetadata.build([4, 1], [1, 1], [[0, 2], [1]], block_size=4, device=torch.device("cpu"))
    assert meta.is_decode
    assert meta.slots.tolist() == [8, 5]
    assert meta.gather_slots.tolist() == [[0, 1, 2, 3, 8], [4, 5, 6, 7, 0]]  # padding reads a masked slot
    full = (meta.decode_mask(None, torch.float32)[:, 0, 0] == 0).tolist()
    assert full == [[True] * 5, [True, True, False, False, False]]
    windowed = (meta.decode_mask(2, torch.float32)[:, 0, 0] == 0).tolist()
    assert windowed == [[False, False, False, True, True], [True, True, False, False, False]]


def _reference_attention(q, k, v, window=None):
    """Dense causal GQA attention of one sequence, the slow obvious way."""
    n, heads, _ = q.shape
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    i = torch.arange(n)
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask &= i[None, :] > i[:, None] - window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1).reshape(n, -1)


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_then_decode_equals_dense_attention(window):
    """Ragged prefill of two sequences, then decode steps, against dense attention over each alone."""
    torch.manual_seed(0)
    heads, kv_heads, dim, bs = 4, 2, 8, 4
    cache = PagedKVCache(1, 16, kv_heads, dim, torch.float32, "cpu", block_size=bs)
    lens = [6, 9]
    total = [n + 3 for n in lens]
    qs = [torch.randn(n, heads, dim) for n in total]
    ks = [torch.randn(n, kv_heads, dim) for n in total]
    vs = [torch.randn(n, kv_heads, dim) for n in total]
    tables = [cache.allocator.allocate(3), cache.allocator.allocate(3)]
    meta = AttentionMetadata.build([0, 0], lens, tables, bs, torch.device("cpu"))
    out = paged_attention(
        torch.cat([q[:n] for q, n in zip(qs, lens)]),
        torch.cat([k[:n] for k, n in zip(ks, lens)]),
        torch.cat([v[:n] for v, n in zip(vs, lens)]),
        cache.flat(0),
        meta,
        window,
    )
    refs = [_reference_attention(q, k, v, window) for q, k, v in zip(qs, ks, vs)]
    torch.testing.assert_close(out[:6], refs[0][:6])
    torch.testing.assert_close(out[6:], refs[1][:9])
    for step in range(3):
        pos = [n + step for n in lens]
        meta = AttentionMetadata.build(pos, [1, 1], tables, bs, torch.device("cpu"))
        assert meta.is_decode
        out = paged_attention(
            torch.stack([q[p] for q, p in zip(qs, pos)]),
            torch.stack([k[p] for k, p in zip(ks, pos)]),
            torch.stack([v[p] for v, p in zip(vs, pos)]),
            cache.flat(0),
            meta,
            window,
        )
        for i, p in enumerate(pos):
            torch.testing.assert_close(out[i], refs[i][p])
