"""Decode steps replayed from CUDA graphs: one forward's ~1000 kernel launches become one.

A small model's decode step on a GPU is bound by launching kernels from Python, not by the
GPU (benchmarks/results/gpu/: ~50 ms a step, the GPU busy ~3 ms of it). A CUDA graph records
a step's kernels once and replays them with fixed shapes and fixed addresses, so a graph
serves one shape: a *bucket* of batch size (the step's sequences, padded up to a
`--cuda-graphs` size, as in TGI) times context width (blocks of keys each sequence
gathers, padded up to a power of two, because Ember's CUDA decode attention gathers a
padded block table and masks it; a paged-attention kernel would need no width bucket).

Every graph reads its inputs from one static buffer (token ids, positions, cache slots,
context lengths and block tables, copied in with one host-to-device copy per step) and
writes its logits into a buffer shared by all graphs. Padding rows write their keys and
values into the cache's spare block, which no sequence owns, and attend to it alone.

Graphs are captured lazily, the first time a bucket is needed, so start-up pays nothing
(vLLM's capture at start-up is a known complaint, anchors.md) and the first step of each
new bucket pays one capture (a few forward passes). Captured graphs depend on the KV
cache's and rotary table's addresses: when either is replaced (warmup re-sizing the cache,
a context beyond the rotary table) they are dropped and captured again.

The same bucket code runs eagerly on other devices (`capture=False`), which is how the
padding, the spare block and the static metadata are tested without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ember.shard.attention import AttentionMetadata, SeqSpan
from ember.shard.kv_cache import PagedKVCache

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_WIDTH_BLOCKS = 8  # the narrowest context bucket: 128 keys at the default block size
WARMUP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS / cuDNN set up their state)


def parse_batch_sizes(text: str | None) -> tuple[int, ...]:
    """`--cuda-graphs 1,2,4,8`: the batch sizes to capture; "0" (or empty) turns graphs off."""
    if text is None:
        return DEFAULT_BATCH_SIZES
    text = text.strip()
    if text in ("", "0"):
        return ()
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--cuda-graphs takes comma-separated batch sizes or 0, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--cuda-graphs batch sizes must be positive, got {text!r}")
    return tuple(sizes)


def width_bucket(blocks: int) -> int:
    """Blocks of keys a graph gathers for a step whose longest context needs `blocks`."""
    width = MIN_WIDTH_BLOCKS
    while width < blocks:
        width *= 2
    return width


@dataclass
class _Bucket:
    """One graph's static inputs, its metadata views over them, and the graph (None: eager)."""

    batch: int
    width: int
    inputs: torch.Tensor  # [4 * batch + batch * width] int64: ids, positions, slots, lengths, block tables
    meta: AttentionMetadata
    graph: torch.cuda.CUDAGraph | None = None

    @property
    def ids(self) -> torch.Tensor:
        return self.inputs[: self.batch]


class DecodeGraphs:
    """Decode steps of a paged Llama-family model (world size 1) by bucket; see the module doc."""

    def __init__(self, model, batch_sizes: tuple[int, ...], capture: bool) -> None:
        self.model = model
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.capture = capture
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.out: torch.Tensor | None = None  # [max batch, vocab] float32 logits, shared by all graphs
        self.pool = None  # one memory pool for all graphs: they never run at once
        self._key: tuple | None = None
        self.disabled_reason: str | None = None

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1] if self.batch_sizes else 0

    def batch_bucket(self, n: int) -> int | None:
        for size in self.batch_sizes:
            if size >= n:
                return size
        return None

    def run(self, seqs, cache: PagedKVCache) -> torch.Tensor | None:
        """[len(seqs), vocab] float32 logits of a decode step (blocks already allocated), or None when
        the step takes the eager path (batch beyond the largest size, a context beyond the rotary table,
        a failed capture)."""
        if self.disabled_reason is not None or cache.scratch_block is None:
            return None
        batch = self.batch_bucket(len(seqs))
        if batch is None:
            return None
        block_size = cache.block_size
        longest = max(s.num_cached for s in seqs)
        rotary = self.model.rotary
        if longest >= rotary.cos.shape[0]:
            return None  # the eager step grows the rotary table; graphs are then captured again
        width = width_bucket(-(-(longest + 1) // block_size))
        key = (id(cache), cache.k[0].data_ptr(), rotary.cos.data_ptr(), rotary.sin.data_ptr())
        if key != self._key:
            self.buckets.clear()  # they point at a replaced cache or rotary table
            self._key = key
        bucket = self.buckets.get((batch, width))
        if bucket is None:
            try:
                bucket = self._new_bucket(batch, width, cache)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly from now on
                self.disabled_reason = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "CUDA graph capture failed (batch %d, %d keys); decode steps run eagerly: %s",
                    batch,
                    width * block_size,
                    self.disabled_reason,
                )
                self.buckets.clear()
                return None
            self.buckets[(batch, width)] = bucket
        bucket.inputs.copy_(self._host_inputs(seqs, batch, width, cache))
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._forward(bucket, cache)
        return self.out[: len(seqs)].clone()

    # --- buckets ------------------------------------------------------------------------------

    @staticmethod
    def _host_inputs(seqs, batch: int, width: int, cache: PagedKVCache) -> torch.Tensor:
        """The static buffer's contents for `seqs`, padded to `batch` rows with spare-block rows."""
        block_size, spare = cache.block_size, cache.scratch_block
        pad = batch - len(seqs)
        ids, positions, slots, lens, tables = [], [], [], [], []
        for s in seqs:
            c = s.num_cached
            ids.append(s.token_ids[c])
            positions.append(c)
            slots.append(s.blocks[c // block_size] * block_size + c % block_size)
            lens.append(c + 1)
            used = s.blocks[: -(-(c + 1) // block_size)]
            tables.extend(used)
            tables.extend([spare] * (width - len(used)))
        ids += [0] * pad
        positions += [0] * pad
        slots += [spare * block_size] * pad
        lens += [1] * pad
        tables += [spare] * (pad * width)
        return torch.tensor(ids + positions + slots + lens + tables, dtype=torch.long)

    def _new_bucket(self, batch: int, width: int, cache: PagedKVCache) -> _Bucket:
        device = cache.device
        if self.out is None:
            self.out = torch.empty(self.max_batch, self.model.lm_head.vocab_size, dtype=torch.float32, device=device)
        inputs = torch.empty(4 * batch + batch * width, dtype=torch.long, device=device)
        ids, positions, slots, lens = inputs[: 4 * batch].view(4, batch)
        meta = AttentionMetadata(
            positions=positions,
            slots=slots,
            is_decode=True,
            spans=[SeqSpan(i, 1, 0) for i in range(batch)],
            context_lens=lens,
            gather_blocks=inputs[4 * batch :].view(batch, width),
            block_size=cache.block_size,
            context_width=width * cache.block_size,
            max_position=0,  # positions are checked against the rotary table before each step (`run`)
        )
        bucket = _Bucket(batch, width, inputs, meta)
        # Padding everywhere: warm-up and capture runs write into the spare block only.
        inputs.copy_(self._host_inputs([], batch, width, cache))
        if not self.capture:
            return bucket
        log.info("capturing a CUDA graph: batch %d, %d keys", batch, width * cache.block_size)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # Masked SDPA without cuDNN's backend, whose support for capture depends on the cuDNN build;
        # the memory-efficient kernel takes the additive mask and records like any other kernel.
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    self._forward(bucket, cache)
            torch.cuda.current_stream(device).wait_stream(stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(bucket, cache)
        bucket.graph = graph
        return bucket

    @torch.inference_mode()
    def _forward(self, bucket: _Bucket, cache: PagedKVCache) -> None:
        """The step a graph records: forward over the static inputs, logits into the shared buffer."""
        bucket.meta._masks.clear()  # the decode mask is computed inside the step, from the static lengths
        hidden = self.model(bucket.ids, bucket.meta, cache)
        self.out[: bucket.batch].copy_(self.model.logits(hidden))
