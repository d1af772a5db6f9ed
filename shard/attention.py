"""Ragged attention over the paged KV cache with torch SDPA.

One forward covers the new tokens of every sequence, flattened. Index tensors
(slots, positions, gathers, masks) are built once per step in `AttentionMetadata`
and reused by every layer, so the per-layer cost is a few tensor ops:

* decode (one new token per sequence): gather each sequence's K/V through its
  block table into a padded `[B, L, kv_heads, head_dim]`, one SDPA call with a
  key mask; query heads are grouped per KV head (GQA without repeating K/V).
* prefill (anything else): one SDPA call per sequence, causal within it, over
  the cached prefix plus the new chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SeqSpan:
    """Where one sequence's new tokens sit in the flattened batch, and its cached prefix."""

    start: int
    num_new: int
    num_cached: int
    ctx_slots: torch.Tensor | None = None  # [num_cached + num_new] slots, when it has a cached prefix


@dataclass
class AttentionMetadata:
    """Per-step indices shared by all layers."""

    positions: torch.Tensor  # [T] absolute position of each new token
    slots: torch.Tensor | None  # [T] cache slot of each new token; None: do not touch the cache
    is_decode: bool
    spans: list[SeqSpan]
    context_lens: torch.Tensor | None = None  # decode: [B] tokens per sequence after this step
    gather_slots: torch.Tensor | None = None  # decode: [B, L] slots of each sequence's context
    max_position: int = 0
    _masks: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        num_cached: list[int],
        num_new: list[int],
        block_tables: list[list[int]] | None,
        block_size: int,
        device: torch.device,
    ) -> "AttentionMetadata":
        """Indices for a ragged step; `block_tables=None` runs without the cache (embeddings)."""
        cached = torch.tensor(num_cached, dtype=torch.long)
        new = torch.tensor(num_new, dtype=torch.long)
        total = int(new.sum())
        seq_idx = torch.repeat_interleave(torch.arange(len(num_new)), new)
        starts = torch.cumsum(new, 0) - new
        positions = torch.arange(total) - (starts - cached)[seq_idx]
        spans = [SeqSpan(s, n, c) for s, n, c in zip(starts.tolist(), num_new, num_cached)]
        max_position = max(c + n for c, n in zip(num_cached, num_new)) - 1
        is_decode = block_tables is not None and all(n == 1 for n in num_new)
        meta = cls(positions=positions.to(device), slots=None, is_decode=is_decode, spans=spans,
                   max_position=max_position)
        if block_tables is None:
            return meta
        width = max(len(b) for b in block_tables)
        table = torch.tensor([b + [0] * (width - len(b)) for b in block_tables], dtype=torch.long)
        meta.slots = (table[seq_idx, positions // block_size] * block_size + positions % block_size).to(device)
        if is_decode:
            ctx = cached + new
            j = torch.arange(int(ctx.max()))
            meta.gather_slots = (table[:, j // block_size] * block_size + j % block_size).to(device)
            meta.context_lens = ctx.to(device)
        else:
            for i, span in enumerate(spans):
                if span.num_cached:
                    j = torch.arange(span.num_cached + span.num_new)
                    span.ctx_slots = (table[i, j // block_size] * block_size + j % block_size).to(device)
        return meta

    def decode_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, 1, L] additive mask: the keys each decode query may see (context, sliding window).

        Additive (0 / -inf) in the query dtype and built once per step: SDPA would
        otherwise convert a boolean mask again in every layer.
        """
        key = ("decode", window, dtype)
        if key not in self._masks:
            assert self.gather_slots is not None and self.context_lens is not None
            j = torch.arange(self.gather_slots.shape[1], device=self.gather_slots.device)
            ctx = self.context_lens.unsqueeze(1)
            mask = j < ctx
            if window is not None:
                mask &= j > ctx - 1 - window
            self._masks[key] = _additive(mask[:, None, None, :], dtype)
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """[n, c + n] additive causal mask (with window) for span i, or None when plain `is_causal` is exact."""
        span = self.spans[i]
        if span.num_cached == 0 and (window is None or span.num_new <= window):
            return None
        key = (i, window, dtype)
        if key not in self._masks:
            device = self.positions.device
            q_pos = torch.arange(span.num_new, device=device).unsqueeze(1) + span.num_cached
            k_pos = torch.arange(span.num_cached + span.num_new, device=device).unsqueeze(0)
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            self._masks[key] = _additive(mask, dtype)
        return self._masks[key]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor] | None,
    meta: AttentionMetadata,
    window: int | None = None,
) -> torch.Tensor:
    """Attention for flattened new tokens. q [T, H, D]; k, v [T, KVH, D]; kv = the layer's flat cache.

    Writes the new K/V into their slots first, then attends. Returns [T, H * D].
    """
    if kv is not None and meta.slots is not None:
        kv[0].index_copy_(0, meta.slots, k)
        kv[1].index_copy_(0, meta.slots, v)
    if meta.is_decode:
        return _decode(q, kv, meta, window)
    return _prefill(q, k, v, kv, meta, window)


def _decode(q: torch.Tensor, kv, meta: AttentionMetadata, window: int | None) -> torch.Tensor:
    batch, heads, dim = q.shape
    kv_heads = kv[0].shape[1]
    flat = meta.gather_slots.view(-1)  # index_select: advanced indexing costs grow with the pool size
    length = meta.gather_slots.shape[1]
    keys = kv[0].index_select(0, flat).view(batch, length, kv_heads, dim).transpose(1, 2)  # [B, KVH, L, D]
    values = kv[1].index_select(0, flat).view(batch, length, kv_heads, dim).transpose(1, 2)
    grouped = q.view(batch, kv_heads, heads // kv_heads, dim)  # query heads of one KV head as rows
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=meta.decode_mask(window, q.dtype))
    return out.reshape(batch, heads * dim)


def _prefill(q, k, v, kv, meta: AttentionMetadata, window: int | None) -> torch.Tensor:
    total, heads, dim = q.shape
    out = torch.empty(total, heads, dim, dtype=q.dtype, device=q.device)
    for i, span in enumerate(meta.spans):
        s, e = span.start, span.start + span.num_new
        if span.num_cached and span.ctx_slots is not None:
            keys, values = kv[0].index_select(0, span.ctx_slots), kv[1].index_select(0, span.ctx_slots)
        else:
            keys, values = k[s:e], v[s:e]
        mask = meta.prefill_mask(i, window, q.dtype)
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )
        out[s:e] = o[0].transpose(0, 1)
    return out.view(total, heads * dim)
