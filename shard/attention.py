"""Ragged attention over the paged KV cache with torch SDPA.

One forward covers the new tokens of every sequence, flattened. Index tensors
(slots, positions, gathers, masks) are built once per step in `AttentionMetadata`
and reused by every layer, so the per-layer cost is a few tensor ops:

* decode (one new token per sequence), on CPU: Ember's C kernel (`kernels/attention.c`)
  reads each sequence's K/V rows in place through its block table, once.
* decode elsewhere (CUDA, or no C compiler): gather each sequence's K/V by whole
  blocks of its block table into a padded `[B, L, kv_heads, head_dim]`, one
  SDPA call with a key mask; query heads are grouped per KV head (GQA without
  repeating K/V). Its indices are computed in plain Python (a handful of
  integers per sequence), not with per-token tensor ops.
* prefill (anything else): one SDPA call per sequence, causal within it, over
  the cached prefix plus the new chunk.
* mixed (running sequences taking one token, then new prompts: a Prefill with
  the running batch): the leading one-token sequences go through the decode
  path as one group (`decode_part`), the rest through the prefill path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ember.shard import native


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
    gather_blocks: torch.Tensor | None = None  # decode: [B, NB] blocks of each sequence's context (0-padded)
    block_size: int = 0
    context_width: int = 0  # decode: the longest context of the step (keys per sequence, padded)
    max_position: int = 0
    decode_part: AttentionMetadata | None = None  # mixed: decode indices of the leading sequences
    # Steps with new prompts, for kernels that attend row by row over the cache (native decode_layers):
    block_table: torch.Tensor | None = None  # [S, max blocks] every sequence's block table, 0-padded
    row_seq: torch.Tensor | None = None  # [T] the sequence of each new token
    row_lens: torch.Tensor | None = None  # [T] keys each new token sees: its position + 1
    _masks: dict = field(default_factory=dict)

    @property
    def decode_rows(self) -> int:
        """Mixed steps: how many leading tokens (one per sequence) take the decode path."""
        return len(self.decode_part.spans) if self.decode_part is not None else 0

    @classmethod
    def build(
        cls,
        num_cached: list[int],
        num_new: list[int],
        block_tables: list[list[int]] | None,
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """Indices for a ragged step; `block_tables=None` runs without the cache (embeddings)."""
        if block_tables is not None and all(n == 1 for n in num_new):
            return cls._build_decode(num_cached, block_tables, block_size, device)
        # Mixed step: leading sequences with a cached prefix and one new token decode as a group.
        lead = 0
        if block_tables is not None:
            while lead < len(num_new) and num_new[lead] == 1 and num_cached[lead] > 0:
                lead += 1
        cached = torch.tensor(num_cached, dtype=torch.long)
        new = torch.tensor(num_new, dtype=torch.long)
        total = int(new.sum())
        seq_idx = torch.repeat_interleave(torch.arange(len(num_new)), new)
        starts = torch.cumsum(new, 0) - new
        positions = torch.arange(total) - (starts - cached)[seq_idx]
        spans = [SeqSpan(s, n, c) for s, n, c in zip(starts.tolist(), num_new, num_cached)]
        max_position = max(c + n for c, n in zip(num_cached, num_new)) - 1
        meta = cls(positions=positions.to(device), slots=None, is_decode=False, spans=spans, max_position=max_position)
        if block_tables is None:
            return meta
        table = _padded_table(block_tables)
        meta.block_size = block_size
        meta.slots = (table[seq_idx, positions // block_size] * block_size + positions % block_size).to(device)
        if device.type == "cpu":
            meta.block_table, meta.row_seq, meta.row_lens = table, seq_idx, positions + 1
        for i, span in enumerate(spans[lead:], start=lead):
            if span.num_cached:
                j = torch.arange(span.num_cached + span.num_new)
                span.ctx_slots = (table[i, j // block_size] * block_size + j % block_size).to(device)
        if lead:
            meta.decode_part = cls._build_decode(num_cached[:lead], block_tables[:lead], block_size, device)
        return meta

    @classmethod
    def _build_decode(
        cls, num_cached: list[int], block_tables: list[list[int]], block_size: int, device: torch.device
    ) -> AttentionMetadata:
        """One new token per sequence: plain-Python index arithmetic (no per-token tensor ops).

        The context is gathered by whole blocks (`gather_blocks`, padded with block 0
        and masked), which copies rows of `block_size` slots instead of single slots.
        """
        slots = [table[c // block_size] * block_size + c % block_size for c, table in zip(num_cached, block_tables)]
        ctx_blocks = [-(-(c + 1) // block_size) for c in num_cached]
        width = max(ctx_blocks)
        blocks = [table[:n] + [0] * (width - n) for table, n in zip(block_tables, ctx_blocks)]
        meta = cls(
            positions=torch.tensor(num_cached, dtype=torch.long).to(device),
            slots=torch.tensor(slots, dtype=torch.long).to(device),
            is_decode=True,
            spans=[SeqSpan(i, 1, c) for i, c in enumerate(num_cached)],
            max_position=max(num_cached),
        )
        meta.gather_blocks = torch.tensor(blocks, dtype=torch.long).to(device)
        meta.context_lens = torch.tensor([c + 1 for c in num_cached], dtype=torch.long).to(device)
        meta.block_size = block_size
        meta.context_width = max(num_cached) + 1
        return meta

    @property
    def gather_slots(self) -> torch.Tensor | None:
        """Decode: [B, context_width] cache slots each sequence's keys come from (padding reads masked slots)."""
        if self.gather_blocks is None:
            return None
        j = torch.arange(self.context_width, device=self.gather_blocks.device)
        return self.gather_blocks[:, j // self.block_size] * self.block_size + j % self.block_size

    def decode_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, 1, L] additive mask: the keys each decode query may see (context, sliding window).

        Additive (0 / -inf) in the query dtype and built once per step: SDPA would
        otherwise convert a boolean mask again in every layer.
        """
        key = ("decode", window, dtype)
        if key not in self._masks:
            assert self.gather_blocks is not None and self.context_lens is not None
            j = torch.arange(self.context_width, device=self.gather_blocks.device)
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


def _padded_table(block_tables: list[list[int]]) -> torch.Tensor:
    """[B, max blocks] block ids, padded with 0 (padding is never read unmasked)."""
    width = max(len(b) for b in block_tables)
    return torch.tensor([b + [0] * (width - len(b)) for b in block_tables], dtype=torch.long)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor] | None,
    meta: AttentionMetadata,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention for flattened new tokens. q [T, H, D]; k, v [T, KVH, D]; kv = the layer's flat cache.

    Writes the new K/V into their slots first (in the cache's dtype, which may be
    narrower than q's), then attends in q's dtype. `scale` multiplies the scores (None: D ** -0.5;
    Gemma's is its `query_pre_attn_scalar` ** -0.5). Returns [T, H * D].
    """
    if kv is not None and meta.slots is not None:
        kernels = native.kernels() if q.device.type == "cpu" else None
        if kernels is None or not kernels.kv_store(k, v, meta.slots, kv[0], kv[1]):
            kv[0].index_copy_(0, meta.slots, k.to(kv[0].dtype))
            kv[1].index_copy_(0, meta.slots, v.to(kv[1].dtype))
    if meta.is_decode:
        return _decode(q, kv, meta, window, scale)
    return _prefill(q, k, v, kv, meta, window, scale)


def _decode(
    q: torch.Tensor, kv, meta: AttentionMetadata, window: int | None, scale: float | None = None
) -> torch.Tensor:
    batch, heads, dim = q.shape
    kernels = native.kernels() if q.device.type == "cpu" else None
    if kernels is not None and kernels.supports_decode(kv[0].dtype):
        out = kernels.paged_decode(
            q.float(),
            kv[0],
            kv[1],
            meta.gather_blocks,
            meta.context_lens,
            meta.block_size,
            window,
            dim**-0.5 if scale is None else scale,
        )
        return out.view(batch, heads * dim).to(q.dtype)
    kv_heads = kv[0].shape[1]
    blocks = meta.gather_blocks.view(-1)
    padded = meta.gather_blocks.shape[1] * meta.block_size
    width = meta.context_width
    # index_select over whole blocks: contiguous block_size-slot rows, and an index 16x shorter;
    # the tail beyond the longest context is sliced off as a view (no copy).
    keys = _block_view(kv[0], meta.block_size).index_select(0, blocks)
    values = _block_view(kv[1], meta.block_size).index_select(0, blocks)
    keys = keys.view(batch, padded, kv_heads, dim)[:, :width].transpose(1, 2).to(q.dtype)  # [B, KVH, L, D]
    values = values.view(batch, padded, kv_heads, dim)[:, :width].transpose(1, 2).to(q.dtype)
    grouped = q.view(batch, kv_heads, heads // kv_heads, dim)  # query heads of one KV head as rows
    out = F.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=meta.decode_mask(window, q.dtype), scale=scale
    )
    return out.reshape(batch, heads * dim)


def _block_view(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """A layer's flat `[slots, kv_heads, head_dim]` cache as `[blocks, block_size, kv_heads, head_dim]`."""
    return flat.view(-1, block_size, *flat.shape[1:])


def _prefill(q, k, v, kv, meta: AttentionMetadata, window: int | None, scale: float | None = None) -> torch.Tensor:
    total, heads, dim = q.shape
    out = torch.empty(total, heads, dim, dtype=q.dtype, device=q.device)
    kernels = native.kernels() if q.device.type == "cpu" and meta.block_table is not None else None
    chunk_kernel = kernels is not None and kv is not None and kernels.prefill_fits(kv[0].dtype, dim)
    lead = meta.decode_rows
    if lead:
        out[:lead] = _decode(q[:lead], kv, meta.decode_part, window, scale).view(lead, heads, dim)
    i = lead
    while i < len(meta.spans):
        run = _equal_fresh_run(meta, i, window)
        if run > 1:  # adjacent new prompts of one length: one batched causal SDPA, no copies
            span = meta.spans[i]
            s, n = span.start, span.num_new
            e = s + run * n
            shape = (run, n, -1, dim)
            o = F.scaled_dot_product_attention(
                q[s:e].view(shape).transpose(1, 2),
                k[s:e].view(shape).transpose(1, 2),
                v[s:e].view(shape).transpose(1, 2),
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
            out[s:e] = o.transpose(1, 2).reshape(run * n, heads, dim)
            i += run
            continue
        span = meta.spans[i]
        s, e = span.start, span.start + span.num_new
        queries, dtype = q[s:e], q.dtype
        over_context = span.num_cached and span.ctx_slots is not None
        if over_context and chunk_kernel:
            # A chunk over a cached context in a bf16 cache: Ember's kernel, the cache read in place, on AMX
            # bf16 tiles (prefill_amx.c: SDPA's bf16 numbers) or float32 FMAs (prefill_fma.c), in less time.
            o = kernels.paged_prefill(
                queries,
                kv[0],
                kv[1],
                meta.block_table[i],
                span.num_cached,
                meta.block_size,
                window,
                dim**-0.5 if scale is None else scale,
            )
            out[s:e] = o.view(e - s, heads, dim).to(q.dtype)
            i += 1
            continue
        if over_context:
            keys = kv[0].index_select(0, span.ctx_slots)
            values = kv[1].index_select(0, span.ctx_slots)
            if keys.dtype == torch.bfloat16 and q.device.type == "cpu":
                # A chunk over a cached context in a bf16 cache: attend in bf16 (the keys and values are
                # bf16 already), on the CPU's bf16 matrix units: half the time of float32 at long contexts.
                queries, dtype = queries.to(torch.bfloat16), torch.bfloat16
            else:
                keys, values = keys.to(dtype), values.to(dtype)
        else:
            keys, values = k[s:e], v[s:e]
        mask = meta.prefill_mask(i, window, dtype)
        i += 1
        o = F.scaled_dot_product_attention(
            queries.transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[s:e] = o[0].transpose(0, 1)
    return out.view(total, heads * dim)


def _equal_fresh_run(meta: AttentionMetadata, i: int, window: int | None) -> int:
    """How many spans from i on are new prompts (no cached prefix, plain causal mask) of span i's length."""
    first = meta.spans[i]
    if first.num_cached or (window is not None and first.num_new > window):
        return 1
    j = i + 1
    while j < len(meta.spans) and meta.spans[j].num_new == first.num_new and not meta.spans[j].num_cached:
        j += 1
    return j - i
