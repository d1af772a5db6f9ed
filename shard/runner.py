"""The seam between batches and model code: run ragged steps over sequences, own the KV cache.

`load_runner` picks Ember's paged Llama-family code when it knows the
architecture and transformers' generic modules otherwise; batches only see
`ModelRunner`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ember import prefix, settings
from ember.shard.attention import AttentionMetadata
from ember.shard.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphs
from ember.shard.dist import TRIVIAL_GROUP, Group, all_reduce, init_distributed
from ember.shard.kv_cache import DEFAULT_BLOCK_SIZE, OutOfBlocks, PagedKVCache
from ember.shard.models.llama import SUPPORTED_MODEL_TYPES, LlamaForCausalLM
from ember.shard.weights import Weights

log = logging.getLogger(__name__)

GiB = 1 << 30
DEFAULT_CPU_KV_BYTES = 1 * GiB
INITIAL_KV_BYTES = 64 << 20  # the small cache that exists before Warmup sizes the real one
CUDA_WIGGLE_ROOM = 0.9  # as TGI: leave 10% of the free memory to the allocator's fragmentation

__all__ = [
    "Sequence",
    "RunnerInfo",
    "StepOutput",
    "ModelRunner",
    "PagedRunner",
    "WarmupError",
    "OutOfBlocks",
    "load_runner",
    "resolve_dtype",
    "read_json",
]


@dataclass
class Sequence:
    """One request's tokens and cache state, as the runner sees it."""

    seq_id: int
    token_ids: list[int]  # prompt + generated so far
    num_cached: int = 0  # tokens whose K/V are already in the cache
    blocks: list[int] = field(default_factory=list)  # paged runner's block table
    # Prefix caching (paged runner): whether this sequence may take cached blocks (not when every
    # prompt token's logits are wanted), its full blocks' names (`ember.prefix`), how many of its
    # blocks are registered under them, and how many prompt tokens came from the cache.
    reuse: bool = True
    names: list[bytes] = field(default_factory=list)
    registered: int = 0
    cached_tokens: int = 0


@dataclass
class RunnerInfo:
    """Model facts reported by the Info rpc."""

    vocab_size: int
    eos_token_ids: list[int]
    pad_token_id: int | None
    dtype: str
    device_type: str
    block_size: int
    window_size: int | None
    model_type: str
    max_position_embeddings: int
    attention_impl: str  # "paged" | "generic"
    hidden_size: int
    requires_padding: bool
    world_size: int
    # Steps may mix running sequences (one new token) with new prompts; padded batches would pad
    # every running sequence to the prompt's length, so only the ragged paged path says yes.
    shared_prefill: bool = False
    # Whether `embed` gives mean-pooled final hidden states (/embed, /v1/embeddings): the runner's to say.
    supports_embeddings: bool = False


@dataclass
class StepOutput:
    logits: torch.Tensor  # float32 [len(seqs), vocab]: each sequence's last token
    prompt_logits: list[torch.Tensor] | None = None  # per sequence [n_new, vocab], when asked


class WarmupError(RuntimeError):
    """The memory budget cannot hold what the router asked for."""


class ModelRunner(ABC):
    """What batches call; see docs/architecture.md ("Runner interface")."""

    info: RunnerInfo

    @abstractmethod
    def step(
        self,
        seqs: list[Sequence],
        want_prompt_logits: bool = False,
        num_new: list[int] | None = None,
        num_logits: list[int] | None = None,
    ) -> StepOutput:
        """Run token_ids[num_cached:] of every sequence in one forward; then num_cached = len(token_ids).

        `num_new` (runners with `info.shared_prefill` only): run just that many of each
        sequence's uncached tokens, a prompt in chunks; the logits are those of each one's last token run.
        `num_logits` (the same runners; speculative decoding): the logits of each sequence's last that
        many tokens run, stacked in order; a sequence with more than one ran draft tokens, so none of its
        blocks is named for the prefix cache until `accept` says how many of them stay.
        """

    def accept(self, seq: Sequence, num_cached: int) -> None:  # noqa: B027 (only runners that speculate act)
        """After a speculative step: only the first `num_cached` tokens' keys and values stay (the rest
        were rejected drafts); blocks beyond what `seq.token_ids` needs go back."""

    def speculation_costs(self, max_draft: int):
        """Measured step times for `speculate.SpeculationPolicy` (None: this runner cannot speculate)."""
        return None

    @abstractmethod
    def free(self, seq: Sequence) -> None:
        """Release everything the runner keeps for `seq`."""

    prefix_caching = False

    def reuse_prefix(self, seqs: list[Sequence]) -> None:  # noqa: B027 (only runners with a prefix cache act)
        """Runners with a prefix cache: advance each sequence over the cached blocks its prompt starts with."""

    def shared_names(self, seq: Sequence, n: int) -> list[bytes]:
        """The names of the cacheable prompt blocks `seq` would start computing with its next `n` tokens:
        a second sequence needing one of them waits a step and then takes it from the cache."""
        return []

    @abstractmethod
    def embed(self, token_lists: list[list[int]]) -> torch.Tensor:
        """[N, hidden] mean-pooled, L2-normalised final hidden states; the KV cache is not touched."""

    @abstractmethod
    def warmup(self, max_prefill_tokens: int, max_total_tokens: int, memory_budget_bytes: int | None = None) -> int:
        """Run the largest prefill once, size the KV cache, return the token capacity."""

    def health(self) -> None:
        """Raise if the device is broken.

        At world size 1 this is a one-token forward. With several ranks a forward
        runs collectives, and a Health arriving between two ranks' Decodes in a
        different order on each rank would pair the wrong collectives; so each
        rank then checks its own weights and device with a local matmul only.
        """
        if self.info.world_size == 1:
            out = self.embed([[0]])
        else:
            weight = next(self.model.parameters())
            row = weight.reshape(-1)[:64].float()
            out = row @ torch.ones_like(row)
        if not torch.isfinite(out).all():
            raise RuntimeError("health check produced non-finite values")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 by default on CPU (bf16 changes answers, see models.md), bfloat16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(names)}")
    return names[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def eos_token_ids(model_dir: Path, config: dict) -> list[int]:
    """EOS ids from generation_config.json, then config.json (either may be an int or a list)."""
    ids: list[int] = []
    for source in (read_json(model_dir / "generation_config.json"), config):
        value = source.get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def pad_token_id(model_dir: Path, config: dict) -> int | None:
    for source in (read_json(model_dir / "generation_config.json"), config):
        if source.get("pad_token_id") is not None:
            return int(source["pad_token_id"])
    return None


def default_cpu_budget() -> int:
    """1 GiB, or half of the memory still available when that is less."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return DEFAULT_CPU_KV_BYTES
    return min(DEFAULT_CPU_KV_BYTES, available // 2)


class PagedRunner(ModelRunner):
    """Ember's model code over the paged KV cache; every rank makes the same allocations."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        model_dir: Path,
        config: dict,
        device: torch.device,
        group: Group,
        kv_cache_bytes: int | None = None,
        cuda_memory_fraction: float = settings.default("cuda-memory-fraction"),
        block_size: int = DEFAULT_BLOCK_SIZE,
        kv_dtype: torch.dtype | None = None,
        decode_graphs: tuple[int, ...] = (),
        prefix_caching: bool = True,
    ) -> None:
        self.model = model
        self.prefix_caching = prefix_caching
        self.device = device
        self.group = group
        self.dtype = model.embed.dtype
        self.kv_dtype = kv_dtype or self.dtype
        self.block_size = block_size
        self.kv_cache_bytes = kv_cache_bytes
        self.cuda_memory_fraction = cuda_memory_fraction
        spec = model.spec
        self.info = RunnerInfo(
            vocab_size=model.lm_head.vocab_size,
            eos_token_ids=eos_token_ids(model_dir, config),
            pad_token_id=pad_token_id(model_dir, config),
            dtype=dtype_name(self.dtype),
            device_type=device.type,
            block_size=block_size,
            window_size=spec.window_size,
            model_type=spec.model_type,
            max_position_embeddings=spec.max_position_embeddings,
            attention_impl="paged",
            hidden_size=spec.hidden_size,
            requires_padding=False,
            world_size=group.world_size,
            shared_prefill=True,
            supports_embeddings=True,
        )
        # Decode steps by CUDA graph (eagerly through the same fixed shapes off CUDA: how tests check them).
        self.graphs: DecodeGraphs | None = None
        if decode_graphs and group.world_size == 1:
            self.graphs = DecodeGraphs(model, decode_graphs, capture=device.type == "cuda")
        initial = min(kv_cache_bytes, INITIAL_KV_BYTES) if kv_cache_bytes else INITIAL_KV_BYTES
        self.cache = self._new_cache(initial // self._bytes_per_block())

    # --- cache sizing -------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        spec = self.model.spec
        return PagedKVCache.bytes_per_block(
            spec.num_layers, self.model.kv_heads_per_rank, spec.head_dim, self.kv_dtype, self.block_size
        )

    def _new_cache(self, num_blocks: int) -> PagedKVCache:
        if num_blocks < 1:
            raise WarmupError(
                f"the KV cache budget does not hold one block of {self.block_size} tokens "
                f"({self._bytes_per_block()} bytes)"
            )
        spec = self.model.spec
        return PagedKVCache(
            spec.num_layers,
            num_blocks,
            self.model.kv_heads_per_rank,
            spec.head_dim,
            self.kv_dtype,
            self.device,
            self.block_size,
            spare_block=self.graphs is not None,
        )

    # --- stepping -----------------------------------------------------------------------------

    def _allocate(self, seqs: list[Sequence], num_new: list[int]) -> None:
        """Give every sequence the blocks the tokens of this step need, all or none. A step fails at once
        when the whole of its sequences' tokens (prompts still in chunks included) could not fit."""
        whole = sum(self.cache.blocks_needed(len(s.token_ids), len(s.blocks)) for s in seqs)
        if whole > self.cache.allocator.num_free:
            raise OutOfBlocks(
                f"step needs {whole} KV blocks, {self.cache.allocator.num_free} of {self.cache.num_blocks} free"
            )
        for seq, n in zip(seqs, num_new):
            need = self.cache.blocks_needed(seq.num_cached + n, len(seq.blocks))
            if need:
                seq.blocks.extend(self.cache.allocator.allocate(need))

    # --- prefix caching -----------------------------------------------------------------------

    def _shareable(self, seq: Sequence) -> int:
        """Leading blocks of `seq` that may come from the cache (0 when it may take none)."""
        if not (self.prefix_caching and seq.reuse):
            return 0
        return prefix.shareable_blocks(len(seq.token_ids), self.block_size)

    def reuse_prefix(self, seqs: list[Sequence]) -> None:
        bs, alloc = self.block_size, self.cache.allocator
        for seq in seqs:
            limit = self._shareable(seq)
            first = seq.num_cached // bs
            # Only at a block boundary, with every block before it registered (so none is private).
            if first >= limit or seq.num_cached % bs or seq.registered != first or len(seq.blocks) != first:
                continue
            prefix.extend(seq.names, seq.token_ids, bs, limit)
            for i in range(first, limit):
                block = alloc.lookup(seq.names[i])
                if block is None:
                    break
                seq.blocks.append(block)
                seq.registered = i + 1
                seq.num_cached += bs
                seq.cached_tokens += bs

    def shared_names(self, seq: Sequence, n: int) -> list[bytes]:
        limit = self._shareable(seq)
        first = seq.num_cached // self.block_size
        end = min(limit, -(-(seq.num_cached + n) // self.block_size))
        if first >= end:
            return []
        return prefix.extend(seq.names, seq.token_ids, self.block_size, end)[first:end]

    def _register(self, seqs: list[Sequence]) -> None:
        """Name the blocks this step filled (prompt and generated tokens alike: a later turn of a chat
        resends both), taking an existing block of the same name where one was computed twice."""
        bs, alloc = self.block_size, self.cache.allocator
        for seq in seqs:
            full = seq.num_cached // bs
            if seq.registered >= full:
                continue
            prefix.extend(seq.names, seq.token_ids, bs, full)
            for i in range(seq.registered, full):
                seq.blocks[i] = alloc.register(seq.blocks[i], seq.names[i])
            seq.registered = full

    @torch.inference_mode()
    def step(
        self,
        seqs: list[Sequence],
        want_prompt_logits: bool = False,
        num_new: list[int] | None = None,
        num_logits: list[int] | None = None,
    ) -> StepOutput:
        if not seqs:
            raise ValueError("step() needs at least one sequence")
        uncached = [len(s.token_ids) - s.num_cached for s in seqs]
        if num_new is None:
            num_new = uncached
        elif any(not 1 <= n <= u for n, u in zip(num_new, uncached)) or len(num_new) != len(seqs):
            raise ValueError("num_new: between 1 and the uncached tokens of each sequence")
        if min(num_new) < 1:
            raise ValueError("every sequence in a step needs at least one uncached token")
        if num_logits is not None and (
            len(num_logits) != len(seqs) or any(not 1 <= m <= n for m, n in zip(num_logits, num_new))
        ):
            raise ValueError("num_logits: between 1 and the tokens each sequence runs")
        self._allocate(seqs, num_new)
        if num_logits is not None and max(num_logits) > 1:
            return self._speculative_step(seqs, num_new, num_logits)
        if self.graphs is not None and not want_prompt_logits and max(uncached) == 1:
            logits = self.graphs.run(seqs, self.cache)
            if logits is not None:
                for s in seqs:
                    s.num_cached = len(s.token_ids)
                if self.prefix_caching:
                    self._register(seqs)
                return StepOutput(logits=logits)
        hidden = self._forward(seqs, num_new)
        output = self._logits(hidden, num_new, want_prompt_logits)
        for s, n in zip(seqs, num_new):
            s.num_cached += n
        if self.prefix_caching:
            self._register(seqs)
        return output

    def _forward(self, seqs: list[Sequence], num_new: list[int]) -> torch.Tensor:
        """The hidden states of the next `num_new` uncached tokens of each sequence (blocks allocated)."""
        ids: list[int] = []
        for s, n in zip(seqs, num_new):
            ids.extend(s.token_ids[s.num_cached : s.num_cached + n])
        input_ids = torch.tensor(ids, dtype=torch.long).to(self.device)
        meta = AttentionMetadata.build(
            [s.num_cached for s in seqs], num_new, [s.blocks for s in seqs], self.block_size, self.device
        )
        return self.model(input_ids, meta, self.cache)

    def _speculative_step(self, seqs: list[Sequence], num_new: list[int], num_logits: list[int]) -> StepOutput:
        """A step whose sequences ran draft tokens: the logits of each one's last `num_logits` tokens.
        Blocks of sequences with drafts are named only once `accept` has dropped the rejected ones."""
        hidden = self._forward(seqs, num_new)
        rows: list[int] = []
        end = 0
        for n, m in zip(num_new, num_logits):
            end += n
            rows.extend(range(end - m, end))
        logits = self.model.logits(hidden.index_select(0, torch.tensor(rows).to(self.device)))
        for s, n in zip(seqs, num_new):
            s.num_cached += n
        if self.prefix_caching:
            self._register([s for s, m in zip(seqs, num_logits) if m == 1])
        return StepOutput(logits=logits)

    def accept(self, seq: Sequence, num_cached: int) -> None:
        if num_cached > seq.num_cached:
            raise ValueError(f"accept: {num_cached} tokens, of {seq.num_cached} cached")
        seq.num_cached = num_cached
        keep = -(-len(seq.token_ids) // self.block_size)
        if len(seq.blocks) > keep:
            self.cache.allocator.free(seq.blocks[keep:])
            del seq.blocks[keep:]
        if self.prefix_caching:
            self._register([seq])

    @torch.inference_mode()
    def speculation_costs(self, max_draft: int, batch_sizes=(1, 2, 4, 8, 16, 32), context: int = 256):
        """Forward seconds of decode steps of each batch size over `context` cached tokens per row, with no
        draft and with `max_draft` draft tokens per row (the fastest of three runs; the slowest rank's, so
        every rank plans the same steps). Sizes the cache cannot hold are left out."""
        from ember.shard.speculate import StepCosts

        bs, alloc = self.block_size, self.cache.allocator
        sizes, plain, drafted = [], [], []
        for batch in batch_sizes:
            per_row = -(-(context + 1 + max_draft) // bs)
            if batch * per_row > alloc.num_free:
                break
            tables = [alloc.allocate(per_row) for _ in range(batch)]
            try:
                times = [self._time_step(tables, context, new) for new in (1, 1 + max_draft)]
            finally:
                for table in tables:
                    alloc.free(table)
            sizes.append(batch)
            plain.append(times[0])
            drafted.append(times[1])
        if not sizes:
            return None
        measured = torch.tensor(plain + drafted, dtype=torch.float64, device=self.device)
        measured = all_reduce(measured, self.group, op="max").tolist()
        costs = StepCosts(sizes, measured[: len(sizes)], measured[len(sizes) :], max_draft)
        log.info(
            "speculation: decode step times measured for batches %s: %s ms plain, %s ms with %d draft tokens a row",
            sizes,
            [round(t * 1e3, 2) for t in costs.plain],
            [round(t * 1e3, 2) for t in costs.drafted],
            max_draft,
        )
        return costs

    def _time_step(self, tables: list[list[int]], context: int, new: int, repeats: int = 3) -> float:
        """The fastest of `repeats` forwards (with their logits) of `new` tokens a row after `context` cached."""
        rows = len(tables)
        input_ids = torch.zeros(rows * new, dtype=torch.long, device=self.device)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            meta = AttentionMetadata.build([context] * rows, [new] * rows, tables, self.block_size, self.device)
            self.model.logits(self.model(input_ids, meta, self.cache))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        return best

    def _logits(self, hidden: torch.Tensor, num_new: list[int], want_prompt_logits: bool) -> StepOutput:
        """Project only the last token of each sequence, unless prompt logits were asked for."""
        if want_prompt_logits:
            all_logits = self.model.logits(hidden)
            prompt = list(all_logits.split(num_new))
            return StepOutput(logits=torch.stack([p[-1] for p in prompt]), prompt_logits=prompt)
        if len(num_new) == hidden.shape[0]:
            return StepOutput(logits=self.model.logits(hidden))
        last = torch.tensor(num_new).cumsum(0).sub_(1).to(self.device)
        return StepOutput(logits=self.model.logits(hidden.index_select(0, last)))

    def free(self, seq: Sequence) -> None:
        self.cache.allocator.free(seq.blocks)
        seq.blocks = []
        seq.num_cached = 0
        seq.registered = 0

    @torch.inference_mode()
    def embed(self, token_lists: list[list[int]]) -> torch.Tensor:
        lens = [len(t) for t in token_lists]
        if not lens or min(lens) < 1:
            raise ValueError("embed() needs non-empty token lists")
        input_ids = torch.tensor([i for t in token_lists for i in t], dtype=torch.long).to(self.device)
        meta = AttentionMetadata.build([0] * len(lens), lens, None, self.block_size, self.device)
        hidden = self.model(input_ids, meta, None).float()
        pooled = torch.stack([h.mean(0) for h in hidden.split(lens)])
        return F.normalize(pooled, dim=-1)

    # --- warmup -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _largest_prefill(self, max_prefill_tokens: int, max_total_tokens: int) -> None:
        """The biggest forward the router may send: max_prefill_tokens split into requests."""
        per_request = max(1, min(max_prefill_tokens, max_total_tokens))
        lens = [per_request] * (max_prefill_tokens // per_request)
        if max_prefill_tokens % per_request:
            lens.append(max_prefill_tokens % per_request)
        input_ids = torch.zeros(sum(lens), dtype=torch.long, device=self.device)
        meta = AttentionMetadata.build([0] * len(lens), lens, None, self.block_size, self.device)
        hidden = self.model(input_ids, meta, None)
        self._logits(hidden, lens, False)

    def _budget_bytes(self, memory_budget_bytes: int | None, prefill_peak: int) -> int:
        if memory_budget_bytes is not None:
            return memory_budget_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(max(0, free - prefill_peak) * self.cuda_memory_fraction * CUDA_WIGGLE_ROOM)
        return self.kv_cache_bytes if self.kv_cache_bytes else default_cpu_budget()

    def warmup(self, max_prefill_tokens: int, max_total_tokens: int, memory_budget_bytes: int | None = None) -> int:
        prefill_peak = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        self._largest_prefill(max_prefill_tokens, max_total_tokens)
        if self.device.type == "cuda":
            # Activations of the largest prefill must stay free beside the cache.
            prefill_peak = torch.cuda.max_memory_allocated(self.device) - before
            self.cache = None  # give the small cache's memory to the new one
            torch.cuda.empty_cache()
        budget = self._budget_bytes(memory_budget_bytes, prefill_peak)
        per_block = self._bytes_per_block()
        num_blocks = torch.tensor([budget // per_block], dtype=torch.long, device=self.device)
        num_blocks = int(all_reduce(num_blocks, self.group, op="min").item())  # same cache on every rank
        capacity = num_blocks * self.block_size
        if num_blocks < math.ceil(max_total_tokens / self.block_size):
            raise WarmupError(
                f"Not enough memory to handle max_total_tokens={max_total_tokens}: the KV cache budget of "
                f"{budget} bytes holds {capacity} tokens ({per_block} bytes per block of {self.block_size}); "
                f"raise --kv-cache-bytes / --cuda-memory-fraction or lower --max-total-tokens"
            )
        self.cache = None
        self.cache = self._new_cache(num_blocks)
        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%d bytes)",
            num_blocks,
            self.block_size,
            capacity,
            num_blocks * per_block,
        )
        return capacity


def load_runner(
    model_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    group: Group | None = None,
    kv_cache_bytes: int | None = None,
    cuda_memory_fraction: float = settings.default("cuda-memory-fraction"),
    matmul_dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    kv_cache_dtype: str | torch.dtype | None = None,
    cuda_graphs: tuple[int, ...] | None = None,
    prefix_caching: bool = True,
) -> ModelRunner:
    """Load a model directory: Ember's paged code for llama/mistral/qwen2/gemma3, transformers' otherwise.

    `matmul_dtype` (paged code only) stores the decoder layers' linear weights in
    another dtype than `dtype`: float32 activations with bfloat16 matmuls halve the
    bytes read per token and use the CPU's bf16 units, at a small cost in precision.
    `quantize` (`int8` / `int4`, paged code on CPU) packs them instead: a half or a
    quarter of bf16's bytes, multiplied in bfloat16.
    `kv_cache_dtype` (paged code only; None or "auto": see `default_kv_dtype`)
    stores the cached keys and values in another dtype than the activations.
    `cuda_graphs` (paged code, world size 1): the batch sizes whose decode steps replay CUDA graphs
    (`cuda_graphs.py`); None: `DEFAULT_BATCH_SIZES` on CUDA, none elsewhere; given off CUDA, the
    same fixed-shape steps run eagerly.
    `prefix_caching` (paged code): full KV blocks stay cached under their tokens' names, and prompts
    that begin with them skip their computation (`BlockAllocator`).
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory: it has no config.json")
    config = read_json(model_dir / "config.json")
    model_type = config.get("model_type", "")
    if quantize is not None:
        from ember.shard.layers import QUANTIZE_KINDS

        if quantize not in QUANTIZE_KINDS:
            raise ValueError(f"unknown quantization {quantize!r}: choose from {', '.join(QUANTIZE_KINDS)}")
        if quantize == "w4a8" and device.type == "cpu":
            from ember.shard.layers import PackedWeight

            reason = PackedWeight.unfit_reason("w4a8", (16, 32), device)  # the kernel's own requirements
            if reason:
                raise ValueError(f"--quantize w4a8: {reason}")
        if matmul_dtype is not None and resolve_dtype(matmul_dtype, device) != torch.bfloat16:
            raise ValueError(f"--quantize {quantize} multiplies in bfloat16; drop --matmul-dtype {matmul_dtype}")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"--quantize {quantize} needs Ember's model code; model_type {model_type!r} runs on the generic path"
            )
        if device.type != "cpu":
            raise ValueError(
                f"--quantize {quantize} has CPU kernels only; on {device.type} serve the model in its dtype"
            )
    if model_type not in SUPPORTED_MODEL_TYPES:
        from ember.shard.models.generic import GenericRunner

        log.warning(
            "model_type %r has no Ember model code: using transformers' modules "
            "(generic path: padded batches, TP=1, slower)",
            model_type,
        )
        return GenericRunner(model_dir, torch_dtype, device, world_size=world_size)
    if group is None:
        group = (
            TRIVIAL_GROUP
            if world_size == 1
            else init_distributed(
                rank,
                world_size,
                settings.value("master-addr"),
                settings.value("master-port"),
                device,
            )
        )
    weights = Weights(model_dir, torch_dtype, device, rank=rank, world_size=world_size)
    # A GGUF's quantized tensors go to the w4a8 kernel as the file's own codes, with no float copy.
    weights.keep_codes = quantize == "w4a8" and device.type == "cpu"
    model = LlamaForCausalLM(config, weights, group).eval()
    matmul = resolve_dtype(matmul_dtype, device) if matmul_dtype is not None else torch_dtype
    weights_note = ""
    if quantize is not None:
        kept = model.quantize(quantize)
        for reason in kept:
            log.warning("not quantized, kept in %s: %s", dtype_name(torch_dtype), reason)
        matmul, weights_note = torch.bfloat16, f" over {quantize} weights"
    elif matmul != torch_dtype or device.type == "cpu":
        model.cast_matmuls(matmul)  # on CPU also in the model's dtype: the weights' oneDNN layout
    if kv_cache_dtype in (None, "auto"):
        kv_dtype = default_kv_dtype(torch_dtype, matmul, device)
    else:
        kv_dtype = resolve_dtype(kv_cache_dtype, device)
    log.info(
        "model_type %r: Ember paged model code (rank %d/%d, %s, matmuls in %s%s, KV cache in %s, %s)",
        model_type,
        rank,
        world_size,
        dtype_name(torch_dtype),
        dtype_name(matmul),
        weights_note,
        dtype_name(kv_dtype),
        device,
    )
    model.log_kernel_paths(kv_dtype)  # one line per kind of layer: which kernel runs it, and why
    if cuda_graphs is None:
        cuda_graphs = DEFAULT_BATCH_SIZES if device.type == "cuda" else ()
    if cuda_graphs and group.world_size > 1:
        log.info("CUDA graphs are not used with tensor parallelism (world size %d)", group.world_size)
    return PagedRunner(
        model,
        model_dir,
        config,
        device,
        group,
        kv_cache_bytes,
        cuda_memory_fraction,
        kv_dtype=kv_dtype,
        decode_graphs=cuda_graphs,
        prefix_caching=prefix_caching,
    )


def default_kv_dtype(dtype: torch.dtype, matmul: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype under `--kv-cache-dtype auto`: the model's, except float32 models on CPU with
    bfloat16 matmuls (`--matmul-dtype bfloat16`, `--quantize`), whose keys and values are cached in
    bfloat16 too: decode attention reads the whole cache every token, and half the bytes is the
    largest part of its cost. Queries, scores and softmax stay float32."""
    if device.type == "cpu" and dtype == torch.float32 and matmul == torch.bfloat16:
        return torch.bfloat16
    return dtype
