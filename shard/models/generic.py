"""The generic path: any other causal LM through transformers' own modules (TP=1, slower).

Each sequence keeps its own per-layer K/V tensors. A step lays the batch out
padded, `[pad | past_i | new_i | pad]` per row, so one forward serves prefill,
decode and mixed steps alike; afterwards the real positions are cut back out.
A row's past and new tokens stay adjacent: transformers' sliding-window masks
(Gemma 3, Mistral) count the distance between cache slots, which then equals the
distance between positions. Only the logits of each row's last token are computed
unless prompt logits are asked for: a 262k vocabulary (Gemma) times a long
prompt is gigabytes.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from ember.shard.runner import (
    ModelRunner,
    RunnerInfo,
    Sequence,
    StepOutput,
    WarmupError,
    default_cpu_budget,
    dtype_name,
    eos_token_ids,
    pad_token_id,
    read_json,
)

log = logging.getLogger(__name__)

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each [1, heads, len, head_dim]


class GenericRunner(ModelRunner):
    """transformers' AutoModelForCausalLM behind the ModelRunner interface, on padded batches."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype, device: torch.device, world_size: int = 1):
        if world_size != 1:
            raise ValueError(
                f"the generic transformers path runs on one shard only (TP=1), but world size is {world_size}; "
                f"use --num-shard 1 for this architecture"
            )
        model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        self.model.to(self.device).eval()
        forward_args = inspect.signature(self.model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache` (the old name warns, then goes).
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self._keeps_logits = "logits_to_keep" in forward_args
        cfg = self.model.config.get_text_config(decoder=True)
        config = read_json(model_dir / "config.json")
        self._kv: dict[int, LayerKV] = {}
        self.info = RunnerInfo(
            vocab_size=self.model.get_output_embeddings().weight.shape[0],
            eos_token_ids=eos_token_ids(model_dir, config),
            pad_token_id=pad_token_id(model_dir, config),
            dtype=dtype_name(dtype),
            device_type=self.device.type,
            block_size=1,
            window_size=getattr(cfg, "sliding_window", None),
            model_type=config.get("model_type", cfg.model_type),
            max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0)),
            attention_impl="generic",
            hidden_size=int(cfg.hidden_size),
            requires_padding=True,
            world_size=1,
            # transformers' causal LMs all return hidden states (output_hidden_states), which `embed` pools.
            supports_embeddings=self.model.config.get_text_config(decoder=True).hidden_size > 0,
        )
        log.warning(
            "generic path loaded for %s: transformers modules, padded batches, TP=1 (slower)", self.info.model_type
        )

    @torch.inference_mode()
    def step(
        self, seqs: list[Sequence], want_prompt_logits: bool = False, num_new: list[int] | None = None
    ) -> StepOutput:
        if not seqs:
            raise ValueError("step() needs at least one sequence")
        if num_new is not None:
            raise ValueError("the generic path runs whole prompts, not chunks")
        past_lens = [s.num_cached for s in seqs]
        new = [s.token_ids[s.num_cached :] for s in seqs]
        if min(len(n) for n in new) < 1:
            raise ValueError("every sequence in a step needs at least one uncached token")
        for s in seqs:
            if s.num_cached and s.seq_id not in self._kv:
                raise KeyError(f"sequence {s.seq_id} claims {s.num_cached} cached tokens the runner does not hold")
        max_past, max_new = max(past_lens), max(len(n) for n in new)
        input_ids = torch.zeros(len(seqs), max_new, dtype=torch.long)
        positions = torch.zeros(len(seqs), max_new, dtype=torch.long)
        mask = torch.zeros(len(seqs), max_past + max_new, dtype=torch.long)
        for i, (p, ids) in enumerate(zip(past_lens, new)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            # The pads after a row's tokens are never attended to; they repeat its last position, which
            # the model's position table holds (absolute embeddings such as GPT-2's end at n_positions).
            positions[i] = torch.arange(p, p + max_new).clamp_(max=p + len(ids) - 1)
            mask[i, max_past - p : max_past + len(ids)] = 1
        cache = self._stacked_cache(seqs, max_past) if max_past else DynamicCache()
        last = [len(ids) - 1 for ids in new]
        kept = None if want_prompt_logits or not self._keeps_logits else sorted(set(last))
        extra = {"logits_to_keep": torch.tensor(kept, device=self.device)} if kept is not None else {}
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **{self._cache_arg: cache},
            **extra,
        )
        self._split_cache(seqs, getattr(out, self._cache_arg), past_lens, [len(n) for n in new], max_past)
        logits = out.logits.float()
        columns = [kept.index(j) for j in last] if kept is not None else last
        rows = torch.arange(len(seqs), device=logits.device)
        prompt = [logits[i, : len(ids)] for i, ids in enumerate(new)] if want_prompt_logits else None
        return StepOutput(logits=logits[rows, torch.tensor(columns, device=logits.device)], prompt_logits=prompt)

    def _stacked_cache(self, seqs: list[Sequence], max_past: int) -> DynamicCache:
        """Left-pad every sequence's past K/V to `max_past` and stack them into one cache.

        A lone sequence (single-stream decode) is neither padded nor stacked: every copy of the whole
        cache is memory traffic its decode step does not need (the cache copies it once more anyway)."""
        rows = [self._kv.get(s.seq_id) if s.num_cached else None for s in seqs]
        template = next(r for r in rows if r is not None)
        layers = []
        for layer, (k0, v0) in enumerate(template):
            ks, vs = [], []
            for row in rows:
                k, v = row[layer] if row is not None else (k0[..., :0, :], v0[..., :0, :])
                pad = max_past - k.shape[-2]
                ks.append(F.pad(k, (0, 0, pad, 0)) if pad else k)
                vs.append(F.pad(v, (0, 0, pad, 0)) if pad else v)
            layers.append((torch.cat(ks), torch.cat(vs)) if len(rows) > 1 else (ks[0], vs[0]))
        return DynamicCache(ddp_cache_data=layers)

    def _split_cache(
        self, seqs: list[Sequence], cache: DynamicCache, past_lens: list[int], new_lens: list[int], max_past: int
    ) -> None:
        """Cut each sequence's real past and new positions (adjacent: `[pad | past | new | pad]`) back out."""
        for i, s in enumerate(seqs):
            start, stop = max_past - past_lens[i], max_past + new_lens[i]
            per_layer = [
                (_row(layer.keys, i, start, stop), _row(layer.values, i, start, stop)) for layer in cache.layers
            ]
            self._kv[s.seq_id] = per_layer
            s.num_cached = len(s.token_ids)

    def free(self, seq: Sequence) -> None:
        self._kv.pop(seq.seq_id, None)
        seq.num_cached = 0

    @torch.inference_mode()
    def embed(self, token_lists: list[list[int]]) -> torch.Tensor:
        lens = [len(t) for t in token_lists]
        if not lens or min(lens) < 1:
            raise ValueError("embed() needs non-empty token lists")
        ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(token_lists):
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = out.hidden_states[-1].float()
        m = mask.to(self.device).unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1)
        return F.normalize(pooled, dim=-1)

    def warmup(self, max_prefill_tokens: int, max_total_tokens: int, memory_budget_bytes: int | None = None) -> int:
        """Run the largest prefill once, then report how many tokens of K/V the budget holds.

        Caches grow per sequence on demand (nothing is preallocated), so the
        capacity is the budget divided by the K/V bytes one token costs.
        """
        limit = self.info.max_position_embeddings or max_total_tokens
        per_request = max(1, min(max_prefill_tokens, max_total_tokens, limit))
        n = max(1, max_prefill_tokens // per_request)
        seqs = [Sequence(seq_id=-1 - i, token_ids=[0] * per_request) for i in range(n)]
        self.step(seqs)
        for s in seqs:
            self.free(s)
        budget = memory_budget_bytes if memory_budget_bytes is not None else default_cpu_budget()
        capacity = budget // self._bytes_per_token()
        if capacity < max_total_tokens:
            raise WarmupError(
                f"Not enough memory to handle max_total_tokens={max_total_tokens}: the KV budget of {budget} bytes "
                f"holds {capacity} tokens ({self._bytes_per_token()} bytes per token)"
            )
        return int(capacity)

    def _bytes_per_token(self) -> int:
        cfg = self.model.config.get_text_config(decoder=True)
        layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
        heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        itemsize = torch.empty(0, dtype=self.model.dtype).element_size()
        return 2 * layers * kv_heads * head_dim * itemsize


def _row(t: torch.Tensor, i: int, start: int, stop: int) -> torch.Tensor:
    """Row `i`'s slots [start, stop) of a [batch, heads, len, head_dim] cache tensor, as its own tensor
    (a view would keep the whole padded batch alive); a lone unpadded row is the tensor itself."""
    if t.shape[0] == 1 and start == 0 and stop == t.shape[-2]:
        return t
    return t[i : i + 1, :, start:stop].clone()
