"""Ember's Llama-family model code (Llama, Llama 3, Mistral, Qwen2, SmolLM2, Gemma 3 text) on TP layers.

The variants differ only in config facts read once by `LlamaSpec`: rope type,
sliding window (Mistral, some Qwen2 layers), qkv bias (Qwen2) and tied
embeddings (SmolLM2). Gemma 3 (`LlamaSpec.gemma`) adds to the same attention and MLP
modules: embeddings scaled by sqrt(hidden), RMSNorms scaling by 1 + w in float32
(`OffsetRMSNorm`), per-head query/key norms before the rotary, norms on the attention's and
the MLP's outputs before each residual add (`GemmaDecoderLayer`), a gelu-tanh MLP, scores
scaled by `query_pre_attn_scalar` ** -0.5, and sliding and full attention layers with their
own rope (`rope_local_base_freq` for the sliding ones). The forward runs over flattened ragged tokens.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.shard import native
from ember.shard.attention import AttentionMetadata, paged_attention
from ember.shard.dist import Group
from ember.shard.kv_cache import PagedKVCache
from ember.shard.layers import (
    ColumnParallelLinear,
    OffsetRMSNorm,
    OneDNNWeight,
    PackedWeight,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    _linear,
    apply_rotary,
    cast_weight,
    inverse_frequencies,
    linear_path,
    pack_weight,
    rope_parameters,
)
from ember.shard.weights import Weights, check_tp_divisible
from ember.sharding import PAGED_MODEL_TYPES, text_config

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = PAGED_MODEL_TYPES
GEMMA_MODEL_TYPES = frozenset({"gemma3_text", "gemma3"})
# With low-precision matmuls, the logits of this many best tokens per row are recomputed in the model dtype.
RESCORED_CANDIDATES = 16
# Steps whose prompt chunks are all at most this long run in FusedDecode (row-by-row attention over the
# cache); longer chunks go through the modules and SDPA. A fresh prompt on SmolLM2 (2 cores) took 20-22 %
# less time fused at 512 tokens, 12-18 % at 1024 and ~10 % at 2048 (w4a8 and bf16 weights): the row-by-row
# attention grows with the square of the chunk, SDPA's blocked kernels less, so the gain shrinks.
FUSED_MAX_NEW_TOKENS = 2048
# ...unless the KV cache is bf16 and the step's prompt chunks over a cached context (a prefix from the cache,
# or earlier chunks) attend over this many (query, key) pairs in all:
# the modules' SDPA then attends in bf16 on the CPU's matrix units, where the row-by-row kernel reads the
# whole context once per row. On SmolLM2 (w4a8, 2 cores) 64 new tokens over 1,300 cached ones took 63 ms
# through the modules against 87 ms fused, 256 over 1,300: 198 against 322; 16 over 1,300 about even.
FUSED_MAX_ATTENTION_PAIRS = 65_536
# Where the library has a chunk kernel (`native.Kernels.prefill_fits`), the fused call attends such chunks
# (runs of more than FUSED_SHORT_SPAN rows over a cached context) itself and keeps them. On AMX tiles
# (prefill_amx.c): 64 new tokens over 1,300 cached took 43 ms against 56 through the modules (their per-op
# calls), 24: 24 against 32, 128: 77 against 90. On AVX2 FMAs (prefill_fma.c; a Zen 3 EPYC): 64 took 114 ms
# against 166 row by row, 128: 250 against 273 through the modules, 256: 472 against 540.
FUSED_SHORT_SPAN = 16  # 16 new tokens over 1,300 cached: about even either way
# Under --quantize, steps of at most this many rows project with an int4 copy of the head: at a few
# rows the head is bound by reading its weights (a quarter of bf16's bytes); beyond, bf16 is faster.
PACKED_HEAD_MAX_ROWS = 8

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class LlamaSpec:
    """The config facts the model code needs, with each variant's defaults resolved."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    layer_windows: list[int | None]
    max_position_embeddings: int
    gemma: bool = False  # Gemma 3's extra norms, embedding scale and per-layer-type rope (module docstring)
    attention_scale: float | None = None  # None: head_dim ** -0.5
    local_rope: list[bool] | None = None  # per layer: rotates with the sliding layers' rope (Gemma 3)
    final_logit_softcapping: float | None = None

    @classmethod
    def from_config(cls, config: dict) -> LlamaSpec:
        model_type = config.get("model_type", "llama")
        if model_type in GEMMA_MODEL_TYPES:
            return cls._gemma(text_config(config), model_type)
        heads = config["num_attention_heads"]
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            hidden_act=config.get("hidden_act", "silu"),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            layer_windows=_layer_windows(config, model_type),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        )

    @classmethod
    def _gemma(cls, config: dict, model_type: str) -> LlamaSpec:
        """Gemma 3's text model (`config`: the text config), with `Gemma3TextConfig`'s defaults."""
        for key, why in (
            ("attn_logit_softcapping", "attention logit softcapping (SDPA and Ember's kernels have none)"),
            ("use_bidirectional_attention", "bidirectional attention (an embedding model, not a causal LM)"),
        ):
            if config.get(key):
                raise NotImplementedError(f"{model_type}: {key}={config[key]!r}: Ember's model code has no {why}")
        heads = config.get("num_attention_heads", 8)
        layer_types = gemma_layer_types(config)
        window = config.get("sliding_window", 4096)
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=config.get("vocab_size", 262_208),
            hidden_size=config.get("hidden_size", 2304),
            intermediate_size=config.get("intermediate_size", 9216),
            num_layers=len(layer_types),
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or 256,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            # transformers' Gemma code reads `hidden_activation` (Gemma 1 configs also carry a `hidden_act`)
            hidden_act=config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh",
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=False,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            layer_windows=[window if t == "sliding_attention" else None for t in layer_types],
            max_position_embeddings=int(config.get("max_position_embeddings", 131_072)),
            gemma=True,
            attention_scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
            local_rope=[t == "sliding_attention" for t in layer_types],
            final_logit_softcapping=config.get("final_logit_softcapping"),
        )

    @property
    def window_size(self) -> int | None:
        """The sliding window when any layer uses one (reported in Info)."""
        windows = [w for w in self.layer_windows if w is not None]
        return max(windows) if windows else None


def _layer_windows(config: dict, model_type: str) -> list[int | None]:
    """Sliding window per layer: Mistral everywhere, Qwen2 only where its layer types say so."""
    n = config["num_hidden_layers"]
    window = config.get("sliding_window")
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    if window is None:
        return [None] * n
    layer_types = config.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if model_type == "qwen2":
        first = config.get("max_window_layers", n)
        return [window if i >= first else None for i in range(n)]
    return [window] * n


def gemma_layer_types(config: dict) -> list[str]:
    """Gemma 3's attention kind per layer: `layer_types`, else every `sliding_window_pattern`-th layer
    (default 6) full and the others sliding, as `Gemma3TextConfig` fills it in."""
    n = config.get("num_hidden_layers", 26)
    layer_types = config.get("layer_types")
    if layer_types:
        return list(layer_types)[:n]
    pattern = int(config.get("sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def gemma_rope(config: dict, layer_type: str) -> dict:
    """Rope parameters of Gemma 3's `layer_type` layers: transformers 5's `rope_parameters` per layer
    type, else transformers 4's spelling (full layers: `rope_theta`, default 1e6, and `rope_scaling`;
    sliding layers: `rope_local_base_freq`, default 1e4, unscaled)."""
    per_type = config.get("rope_parameters") or {}
    if per_type and all(isinstance(v, dict) for v in per_type.values()) and per_type.get(layer_type):
        params = dict(per_type[layer_type])
    elif layer_type == "sliding_attention":
        params = {"rope_theta": config.get("rope_local_base_freq", 10_000.0)}
    else:
        params = rope_parameters(
            {"rope_scaling": config.get("rope_scaling"), "rope_theta": config.get("rope_theta", 1_000_000.0)}
        )
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", 10_000.0 if layer_type == "sliding_attention" else 1_000_000.0)
    return params


def _rotary(params: dict, spec: LlamaSpec, weights: Weights) -> RotaryEmbedding:
    max_pos = spec.max_position_embeddings
    inv_freq = inverse_frequencies(params, spec.head_dim, max_pos)
    return RotaryEmbedding(inv_freq, weights.dtype, weights.device, initial_len=min(max_pos, 8192))


class LlamaAttention(torch.nn.Module):
    def __init__(
        self, spec: LlamaSpec, weights: Weights, prefix: str, group: Group, layer: int, norm_cls=RMSNorm
    ) -> None:
        super().__init__()
        ws = group.world_size
        self.layer = layer
        self.heads = spec.num_heads // ws
        self.kv_heads = spec.num_kv_heads // ws
        self.head_dim = spec.head_dim
        self.window = spec.layer_windows[layer]
        self.scale = spec.attention_scale
        self.rope = int(spec.local_rope[layer]) if spec.local_rope else 0  # which cos/sin table it rotates with
        self.qkv = ColumnParallelLinear.load(
            weights, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"], bias=spec.qkv_bias
        )
        self.o_proj = RowParallelLinear.load(weights, f"{prefix}.o_proj", group, bias=spec.o_bias)
        # Gemma 3: RMSNorms over each query and key head (replicated: head_dim wide), before the rotary.
        self.q_norm = self.k_norm = None
        if spec.gemma:
            self.q_norm = norm_cls.load(weights, f"{prefix}.q_norm.weight", spec.rms_norm_eps)
            self.k_norm = norm_cls.load(weights, f"{prefix}.k_norm.weight", spec.rms_norm_eps)

    def forward(self, x, cos, sin, meta: AttentionMetadata, cache: PagedKVCache | None) -> torch.Tensor:
        total = x.shape[0]
        qkv = self.qkv.forward(x)  # (.forward: no module-call overhead; Ember's modules have no hooks)
        qk_width = (self.heads + self.kv_heads) * self.head_dim
        if self.q_norm is not None:  # normalized in place, per head
            heads = qkv[:, :qk_width].view(total, self.heads + self.kv_heads, self.head_dim)
            heads[:, : self.heads] = self.q_norm.forward(heads[:, : self.heads])
            heads[:, self.heads :] = self.k_norm.forward(heads[:, self.heads :])
        kernels = native.kernels() if qkv.device.type == "cpu" else None
        if kernels is not None and kernels.fits(cos, sin, qkv):
            kernels.rotary_(qkv, self.heads + self.kv_heads, self.head_dim, cos, sin)  # in place, one pass
            qk = qkv[:, :qk_width].view(total, self.heads + self.kv_heads, self.head_dim)
        else:
            qk = apply_rotary(qkv[:, :qk_width].view(total, self.heads + self.kv_heads, self.head_dim), cos, sin)
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        v = qkv[:, qk_width:].view(total, self.kv_heads, self.head_dim)
        kv = cache.flat(self.layer) if cache is not None else None
        return self.o_proj.forward(paged_attention(q, k, v, kv, meta, self.window, self.scale))


class LlamaMLP(torch.nn.Module):
    def __init__(self, spec: LlamaSpec, weights: Weights, prefix: str, group: Group) -> None:
        super().__init__()
        self.gate_up = ColumnParallelLinear.load(
            weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], bias=spec.mlp_bias
        )
        self.down = RowParallelLinear.load(weights, f"{prefix}.down_proj", group, bias=spec.mlp_bias)
        self.act = _ACTIVATIONS[spec.hidden_act]
        self.silu = self.act is F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up.forward(x)
        kernels = native.kernels() if self.silu and gate_up.device.type == "cpu" else None
        if kernels is not None and kernels.fits(gate_up):
            return self.down.forward(kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down.forward(self.act(gate) * up)


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, spec: LlamaSpec, weights: Weights, layer: int, group: Group) -> None:
        super().__init__()
        prefix = f"model.layers.{layer}"
        self.input_norm = RMSNorm.load(weights, f"{prefix}.input_layernorm.weight", spec.rms_norm_eps)
        self.attn = LlamaAttention(spec, weights, f"{prefix}.self_attn", group, layer)
        self.post_norm = RMSNorm.load(weights, f"{prefix}.post_attention_layernorm.weight", spec.rms_norm_eps)
        self.mlp = LlamaMLP(spec, weights, f"{prefix}.mlp", group)

    def forward(self, delta, residual, cos, sin, meta: AttentionMetadata, cache: PagedKVCache | None):
        """(this layer's output delta, the residual stream before it): each norm adds the pending delta
        to the residual as it reads it (one pass with Ember's CPU kernel). Layer 0 gets residual None."""
        x, residual = self.input_norm.add_and_norm(delta, residual)
        x, residual = self.post_norm.add_and_norm(self.attn.forward(x, cos, sin, meta, cache), residual)
        return self.mlp.forward(x), residual


class GemmaDecoderLayer(torch.nn.Module):
    """Gemma 3's layer: Llama's attention and MLP modules, each between two `OffsetRMSNorm`s (the second
    normalizes the block's output before the residual add), plus per-head query/key norms."""

    def __init__(self, spec: LlamaSpec, weights: Weights, layer: int, group: Group, prefix: str) -> None:
        super().__init__()
        prefix = f"{prefix}.layers.{layer}"
        eps = spec.rms_norm_eps
        self.input_norm = OffsetRMSNorm.load(weights, f"{prefix}.input_layernorm.weight", eps)
        self.attn = LlamaAttention(spec, weights, f"{prefix}.self_attn", group, layer, norm_cls=OffsetRMSNorm)
        self.attn_out_norm = OffsetRMSNorm.load(weights, f"{prefix}.post_attention_layernorm.weight", eps)
        # The norm before the MLP, with the residual add: Llama's `post_norm` (Gemma's pre_feedforward_layernorm).
        self.post_norm = OffsetRMSNorm.load(weights, f"{prefix}.pre_feedforward_layernorm.weight", eps)
        self.mlp = LlamaMLP(spec, weights, f"{prefix}.mlp", group)
        self.mlp_out_norm = OffsetRMSNorm.load(weights, f"{prefix}.post_feedforward_layernorm.weight", eps)

    def forward(self, delta, residual, cos, sin, meta: AttentionMetadata, cache: PagedKVCache | None):
        """As `LlamaDecoderLayer.forward`: the delta returned is the MLP's normalized output."""
        x, residual = self.input_norm.add_and_norm(delta, residual)
        attn = self.attn_out_norm.add_and_norm(self.attn.forward(x, cos, sin, meta, cache), None)[0]
        x, residual = self.post_norm.add_and_norm(attn, residual)
        return self.mlp_out_norm.add_and_norm(self.mlp.forward(x), None)[0], residual


def _text_prefix(weights: Weights) -> str:
    """Where the text model's tensors are: `model` (causal LMs), or inside a Gemma 3 multimodal
    checkpoint (`language_model.model` as Google published them, `model.language_model` as transformers 5
    saves them)."""
    for prefix in ("model", "model.language_model", "language_model.model"):
        if weights.has(f"{prefix}.embed_tokens.weight"):
            return prefix
    return "model"


class LlamaForCausalLM(torch.nn.Module):
    """The whole model on this rank's slices; `forward` returns final-normed hidden states."""

    def __init__(self, config: dict, weights: Weights, group: Group) -> None:
        super().__init__()
        check_tp_divisible(config, group.world_size)
        spec = LlamaSpec.from_config(config)
        self.spec = spec
        prefix = _text_prefix(weights)
        self.embed = VocabParallelEmbedding.load(weights, f"{prefix}.embed_tokens.weight", group)
        if spec.gemma:
            self.layers = torch.nn.ModuleList(
                GemmaDecoderLayer(spec, weights, i, group, prefix) for i in range(spec.num_layers)
            )
            self.norm = OffsetRMSNorm.load(weights, f"{prefix}.norm.weight", spec.rms_norm_eps)
        else:
            self.layers = torch.nn.ModuleList(
                LlamaDecoderLayer(spec, weights, i, group) for i in range(spec.num_layers)
            )
            self.norm = RMSNorm.load(weights, f"{prefix}.norm.weight", spec.rms_norm_eps)
        head = "lm_head.weight"
        if spec.tie_word_embeddings or not weights.has(head):
            self.lm_head = ParallelLMHead.tied(self.embed)
        else:
            self.lm_head = ParallelLMHead.load(weights, head, group)
        text = text_config(config)
        if spec.gemma:
            # Gemma scales the embeddings by sqrt(hidden) rounded to their dtype (55.5 for 3072 in bf16, as trained).
            self.embed_scale = torch.tensor(spec.hidden_size**0.5).to(self.embed.dtype).to(self.embed.device)
            self.rotary = _rotary(gemma_rope(text, "full_attention"), spec, weights)
            self.local_rotary = _rotary(gemma_rope(text, "sliding_attention"), spec, weights)
        else:
            self.embed_scale = None
            self.rotary = RotaryEmbedding.from_config(config, spec.head_dim, weights.dtype, weights.device)
            self.local_rotary: RotaryEmbedding | None = None
        self.kv_heads_per_rank = spec.num_kv_heads // group.world_size
        self.fast_head: torch.Tensor | OneDNNWeight | None = None  # see cast_matmuls
        self.packed_head: PackedWeight | None = None  # see quantize
        self.fused: FusedDecode | None = None  # see quantize
        self.fused_why = "the fused step is built by cast_matmuls / quantize, on CPU"  # why fused, or why not
        self.q8_head: native.Q4Weight | None = None  # see quantize

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, cache: PagedKVCache | None) -> torch.Tensor:
        tables = [self.rotary.cos_sin(meta.positions, meta.max_position)]
        delta, residual = self.embed(input_ids), None
        if self.embed_scale is not None:
            delta = delta * self.embed_scale
        if self.local_rotary is not None:  # grown with `rotary`, so its table's length is the same
            tables.append(self.local_rotary.cos_sin(meta.positions, meta.max_position))
        cos, sin = tables[0]
        if self.fused is not None and cache is not None and meta.slots is not None:
            done = self.fused.run(delta, cos, sin, meta, cache)
            if done is not None:
                return self.norm.add_and_norm(*done)[0]
        for layer in self.layers:
            cos, sin = tables[layer.attn.rope]
            delta, residual = layer.forward(delta, residual, cos, sin, meta, cache)
        return self.norm.add_and_norm(delta, residual)[0]

    def cast_matmuls(self, dtype: torch.dtype) -> None:
        """Keep the linear weights in `dtype` (e.g. bfloat16 under float32 activations), in
        oneDNN's layout on CPU (`OneDNNWeight`); `dtype` may be the model's own.

        Embedding, norms, attention and KV cache keep the model dtype. Under another
        dtype the LM head runs in it too, but the logits of each row's
        `RESCORED_CANDIDATES` best tokens are then recomputed from the model-dtype
        weights: greedy choices between near-ties (SmolLM2's "capital of France"
        answer hangs on one) are decided by float32 logits, at the cost of a few
        rows of weights per token.
        """
        for layer in self.layers:
            cast_weight(layer.attn.qkv, dtype, with_bias=True)
            cast_weight(layer.attn.o_proj, dtype, with_bias=False)
            cast_weight(layer.mlp.gate_up, dtype, with_bias=True)
            cast_weight(layer.mlp.down, dtype, with_bias=False)
        if self.lm_head.group.is_trivial and dtype != self.lm_head.weight.dtype:
            self.fast_head = _fast_copy(self.lm_head.weight.data, dtype)
        self.fused, self.fused_why = FusedDecode.build(self)  # bf16 weights on Ember's kernel: one C call

    def quantize(self, kind: str) -> list[str]:
        """Pack the decoder layers' linear weights as `kind` (int8 / int4, see `PackedWeight`).

        The LM head keeps its model-dtype weights (they are the tied embedding) and
        gets a bfloat16 copy and, under int4, an int4 copy for steps of up to
        `PACKED_HEAD_MAX_ROWS` rows; either way each row's best candidates are
        rescored in the model dtype, as under `cast_matmuls(bfloat16)`. (So under
        int4 the logits beyond those candidates depend on the step's row count, as
        bf16 kernels' rounding does.) Under w4a8 the head is 8-bit codes per 32 inputs
        on Ember's VNNI kernel instead (`q8_head`; KL against float32 0.0034 vs 0.0030
        with the bf16 head, benchmarks/results/quality.md), also rescored, and the decoder
        layers run in one C call (`FusedDecode`). Returns why any weight stayed unpacked
        (e.g. a shape the int4 kernel cannot take).
        """
        kept = []
        for i, layer in enumerate(self.layers):
            for name, module in (
                ("qkv", layer.attn.qkv),
                ("o_proj", layer.attn.o_proj),
                ("gate_up", layer.mlp.gate_up),
                ("down", layer.mlp.down),
            ):
                reason = pack_weight(module, kind)
                if reason:
                    kept.append(f"layer {i} {name}: {reason}")
        self.fused, self.fused_why = FusedDecode.build(self)  # w4a8: the layers in one C call
        head = self.lm_head.weight
        if isinstance(head, native.Q4Weight):  # a GGUF's own quantized head (or tied embedding), kept as codes
            if self.lm_head.group.is_trivial:
                self.q8_head = head
            return kept
        head = head.data
        head_fits = PackedWeight.unfit_reason(kind, tuple(head.shape), head.device) is None
        if kind == "w4a8" and self.lm_head.group.is_trivial and head_fits:
            # int8 codes per 32 inputs on the VNNI kernel: 1.25 bytes per weight against bf16's 2, and
            # twice bf16's multiplies per instruction; the rescored candidates keep greedy choices exact.
            self.q8_head = native.Q4Weight.quantize8(head)
        elif self.lm_head.group.is_trivial:
            # (w4a8 takes 8-bit codes above: an int4 head with int8 activations blurred every logit outside
            # the rescored candidates, KL 0.021 vs 0.0033 nats/token with the bf16 head, benchmarks/quality.py.)
            if kind == "int4" and head_fits:
                self.packed_head = PackedWeight.quantize(head, kind, keep_dense=False)  # fast_head is its dense
            self.fast_head = _fast_copy(head, torch.bfloat16)
        return kept

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the whole vocabulary (gathered across ranks), soft-capped where the config
        says so (`final_logit_softcapping`: cap · tanh(logit / cap), after any rescoring: the order is kept)."""
        logits = self._logits(hidden)
        cap = self.spec.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        packed = self.packed_head
        if self.q8_head is not None and hidden.dtype == torch.float32:
            approx = native.kernels().q4_linear(hidden.contiguous(), self.q8_head)
        elif packed is not None and (packed.q4 is not None or hidden.shape[0] <= PACKED_HEAD_MAX_ROWS):
            approx = packed.linear(hidden).float()  # Ember's int4 kernel beats bf16 at any row count
        elif self.fast_head is not None:
            approx = _linear(hidden, self.fast_head).float()
        else:
            return self.lm_head(hidden).float()
        k = min(RESCORED_CANDIDATES, approx.shape[-1])
        kernels = native.kernels() if approx.device.type == "cpu" else None
        if kernels is not None and approx.is_contiguous():
            best = kernels.topk_indices(approx, k)  # [N, k]; the set of torch's topk, in one pass
        else:
            best = approx.topk(k, dim=-1).indices  # [N, k]
        rows = self.lm_head.rows(best.view(-1)).view(*best.shape, -1)  # [N, k, H]
        exact = torch.bmm(rows, hidden.unsqueeze(-1).to(rows.dtype)).squeeze(-1).float()
        return approx.scatter_(1, best, exact)

    def kernel_paths(self, kv_dtype: torch.dtype | None = None) -> list[tuple[str, str, str]]:
        """(kind of layer, the path it runs on, why) per kind of layer, as decided at load by
        `cast_matmuls` / `quantize` (native.py's docstring lists the paths); `kv_dtype`: the KV cache's
        (default: the model's). What `log_kernel_paths` logs."""
        device, dtype = self.embed.device, self.embed.dtype
        kv_dtype = kv_dtype or dtype
        kernels = native.kernels() if device.type == "cpu" else None
        if kernels is not None:
            no_kernels = ""
        elif device.type != "cpu":
            no_kernels = f"on {device.type}: Ember's kernels are CPU's"
        else:
            no_kernels = f"Ember's C kernels are unavailable: {native.unavailable_reason()}"
        name = str(dtype).removeprefix("torch.")
        paths = []

        found: dict[tuple[str, str], int] = {}
        for layer in self.layers:
            for linear in (layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down):
                key = linear_path(linear.weight)
                found[key] = found.get(key, 0) + 1
        if len(found) == 1:
            paths.append(("decoder linears", *next(iter(found))))
        else:
            paths.append(
                (
                    "decoder linears",
                    "; ".join(f"{n} x {path}" for (path, _), n in found.items()),
                    "; ".join(dict.fromkeys(why for _, why in found)),
                )
            )

        if self.fused is not None:
            kind = "bf16 weights" if self.fused.bf16_weights else "w4a8"
            path = (
                f"{len(self.layers)} layers in one C call (decode_layers, {kind}) for decode steps and prompt "
                f"chunks up to {FUSED_MAX_NEW_TOKENS} tokens"
            )
            paths.append(("fused step", path, self.fused_why))
        else:
            paths.append(("fused step", "none: layer by layer through the modules", self.fused_why))

        if kernels is not None and kernels.supports_decode(kv_dtype):
            prefill, why = "torch SDPA", f"CPU, KV cache in {str(kv_dtype).removeprefix('torch.')}"
            if kernels.prefill_fits(kv_dtype, self.spec.head_dim):
                kind, how = ("AMX bf16", "AMX bf16 tiles") if kernels.prefill_amx else ("float32 FMA", "no AMX")
                prefill = f"torch SDPA for fresh prompts, Ember's {kind} kernel for chunks over a cached context"
                why += f", {how}"
            decode = "decode: Ember's paged kernel, the cache read in place"
            paths.append(("attention", f"{decode}; prefill: {prefill}", why))
        else:
            why = no_kernels if kernels is None else f"Ember's kernel reads no {kv_dtype} cache"
            paths.append(("attention", "decode: blocks gathered, torch SDPA; prefill: torch SDPA", why))

        if kernels is not None and dtype == torch.float32:
            act = "" if self.spec.hidden_act in ("silu", "swish") else f" ({self.spec.hidden_act} in torch)"
            paths.append(
                ("norm, rotary, silu*mul", f"Ember's C kernels, row by row{act}", "float32 activations on CPU")
            )
        else:
            paths.append(
                (
                    "norm, rotary, silu*mul",
                    "torch ops",
                    no_kernels if kernels is None else f"activations in {name}: the kernels take float32",
                )
            )

        k = min(RESCORED_CANDIDATES, self.lm_head.vocab_size)
        rescored = f"; each row's top {k} ({'topk_rows' if kernels else 'torch.topk'}) rescored in {name}"
        if self.q8_head is not None:
            paths.append(
                (
                    "lm head",
                    f"8-bit codes per 32 inputs on Ember's int8 kernel ({kernels.q4_isa})" + rescored,
                    "--quantize w4a8: 1.25 bytes per weight, twice bf16's products per instruction",
                )
            )
        elif self.packed_head is not None:
            beyond = linear_path(self.fast_head)[0] if self.fast_head is not None else "the model's dtype"
            kind = self.packed_head.kind
            paths.append(
                (
                    "lm head",
                    f"{kind} on torch's kernel up to {PACKED_HEAD_MAX_ROWS} rows, beyond: {beyond}" + rescored,
                    f"--quantize {kind}",
                )
            )
        elif self.fast_head is not None:
            path, why = linear_path(self.fast_head)
            paths.append(("lm head", path + rescored, why))
        elif self.lm_head.group.is_trivial:
            paths.append(("lm head", f"torch F.linear, {name} weights", "matmuls in the model's dtype"))
        else:
            paths.append(
                (
                    "lm head",
                    f"torch F.linear, {name} weights, vocab-sharded, all-gathered",
                    f"tensor parallel (world size {self.lm_head.group.world_size})",
                )
            )
        return paths

    def log_kernel_paths(self, kv_dtype: torch.dtype | None = None) -> list[tuple[str, str, str]]:
        """Log `kernel_paths`, one line per kind of layer; returns them."""
        paths = self.kernel_paths(kv_dtype)
        for kind, path, why in paths:
            log.info("%s: %s (why: %s)", kind, path, why)
        return paths


class FusedDecode:
    """Steps with every decoder layer in one C call (`decode_layers`, kernels/fused_step.c): w4a8 models,
    and float32 models whose linear weights are bf16 on Ember's kernel (`--matmul-dtype bfloat16`,
    `native.BF16Weight`).

    Same arithmetic as the per-layer modules over Ember's kernels, without the Python, the
    allocations and the thread forks between ops: at SmolLM2's size these cost as much as the
    attention. Decode steps match the modules bit for bit (tested). Steps with new prompts (prefill,
    mixed) run too while every prompt chunk is at most `FUSED_MAX_NEW_TOKENS` long: each token then
    attends row by row over its sequence's keys in the cache, faster than the modules with SDPA up to
    that length; the prompt's own keys are read back in the cache's dtype (bf16 by default), as
    decode steps read every key. Longer chunks take the modules and SDPA.

    Built only where every piece fits (`unfit_reason`: world size 1, all four projections of every
    layer on the VNNI kernel or all on the bf16 one, without biases, silu MLP, float32 activations);
    `run` returns None for a step it cannot take (a KV cache dtype other than float32 / bf16, a long
    chunk), which then takes the modules.

    The kernel's arguments live in one `native.DecodeStep`, built here once: the model's shapes and a
    `native.DecodeLayer` table of each layer's weights; the cache's addresses are bound when the
    cache first shows up (`_bind_cache`), the step's tensors before each call.
    """

    def __init__(self, model: LlamaForCausalLM, kernels: native.Kernels, bf16_weights: bool) -> None:
        spec = model.spec
        self.kernels = kernels
        self.bf16_weights = bf16_weights
        self.layer_table = (native.DecodeLayer * len(model.layers))()
        for entry, layer in zip(self.layer_table, model.layers):
            entry.input_norm = layer.input_norm.weight.data_ptr()
            entry.post_norm = layer.post_norm.weight.data_ptr()
            for name, linear in (
                ("qkv", layer.attn.qkv),
                ("o_proj", layer.attn.o_proj),
                ("gate_up", layer.mlp.gate_up),
                ("down", layer.mlp.down),
            ):
                weight = linear.weight if bf16_weights else linear.weight.q4
                setattr(entry, name, native.LinearWeights.of(weight))
            entry.window = layer.attn.window or 0  # k_cache / v_cache: see _bind_cache
        attn = model.layers[0].attn
        self.step = native.DecodeStep(
            layers=ctypes.cast(self.layer_table, ctypes.POINTER(native.DecodeLayer)),
            num_layers=len(model.layers),
            hidden=spec.hidden_size,
            heads=attn.heads,
            kv_heads=attn.kv_heads,
            head_dim=spec.head_dim,
            inter=spec.intermediate_size,
            eps=float(model.layers[0].input_norm.eps),
            scale=spec.head_dim**-0.5,
            bf16_weights=int(bf16_weights),
        )
        self.layers = model.layers  # keeps the weights whose addresses the table holds alive
        self._cache_key: tuple | None = None

    @staticmethod
    def unfit_reason(model: LlamaForCausalLM) -> str | None:
        """Why `model`'s decoder layers cannot run in one C call (None: they can)."""
        if model.spec.gemma:
            return (
                "Gemma's layers are not the fused step's Llama layers: it has silu only and two norms per layer "
                "(Gemma has gelu-tanh, four norms per layer, query/key norms and its own attention scale)"
            )
        if model.embed.device.type != "cpu":
            return f"on {model.embed.device.type}: the fused step is a CPU kernel"
        kernels = native.kernels()
        if kernels is None:
            return f"Ember's C kernels are unavailable ({native.unavailable_reason()})"
        if not model.lm_head.group.is_trivial:
            return f"tensor parallel (world size {model.lm_head.group.world_size}): the fused step has no all-reduce"
        linears = [
            w for layer in model.layers for w in (layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down)
        ]
        if any(linear.bias is not None for linear in linears):
            return "the linears have biases (e.g. Qwen2's qkv bias), which the fused step does not add"
        if all(isinstance(linear.weight, native.BF16Weight) for linear in linears):
            if not kernels.bf16:
                return "bf16 weights on a CPU without AVX-512 BF16"
        elif not all(isinstance(linear.weight, PackedWeight) and linear.weight.q4 is not None for linear in linears):
            paths = sorted({linear_path(linear.weight)[0] for linear in linears})
            return f"the linears are {' / '.join(paths)}: the fused step takes w4a8 or bf16 on Ember's kernel"
        elif any(linear.weight.q4.bits != 4 for linear in linears):
            return "some linears hold 5- or 8-bit codes (a GGUF's 5- to 8-bit tensors): the fused step takes 4-bit ones"
        if not kernels.q4:
            return "a CPU without AVX2 or AVX-512 VNNI (the fused step is built with the int8 kernels)"
        if model.embed.dtype != torch.float32:
            return f"activations in {model.embed.dtype}: the fused step takes float32"
        if model.spec.hidden_act not in ("silu", "swish"):
            return f"activation {model.spec.hidden_act!r}: the fused step has silu only"
        if len({layer.input_norm.eps for layer in model.layers} | {layer.post_norm.eps for layer in model.layers}) != 1:
            return "the layers' RMSNorm epsilons differ: the fused step takes one"
        for layer in model.layers:
            for norm in (layer.input_norm, layer.post_norm):
                if not native.Kernels.fits(norm.weight):
                    return "an RMSNorm weight is not a contiguous float32 CPU tensor"
        return None

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> tuple[FusedDecode | None, str]:
        """(the fused step, or None, and why): what `kernel_paths` reports."""
        reason = cls.unfit_reason(model)
        if reason is not None:
            return None, reason
        bf16_weights = isinstance(model.layers[0].attn.qkv.weight, native.BF16Weight)
        why = "bf16 weights on Ember's kernel" if bf16_weights else "w4a8 weights"
        return cls(model, native.kernels(), bf16_weights), f"{why}, float32 activations, world size 1"

    def _bind_cache(self, cache: PagedKVCache) -> None:
        """Point the table at `cache`'s layers (once per cache)."""
        key = (id(cache), cache.k[0].data_ptr(), cache.dtype, cache.block_size)
        if key != self._cache_key:
            for entry, k, v in zip(self.layer_table, cache.k, cache.v):
                entry.k_cache, entry.v_cache = k.data_ptr(), v.data_ptr()
            self.step.bf16_cache = int(cache.dtype == torch.bfloat16)
            self.step.block_size = cache.block_size
            # chunks over a cached context attend on the chunk kernel (AMX tiles or FMAs) in the fused call
            # itself; without one they leave it for the modules beyond FUSED_MAX_ATTENTION_PAIRS
            chunked = self.kernels.prefill_fits(cache.dtype, self.step.head_dim)
            self.step.chunk_rows = FUSED_SHORT_SPAN if chunked else 0
            self._cache_key = key

    def run(
        self,
        embeddings: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        cache: PagedKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(last layer's output, residual stream) of a step, or None when the step does not fit."""
        if cache.dtype not in (torch.float32, torch.bfloat16) or not native.Kernels.fits(embeddings, cos, sin):
            return None
        self._bind_cache(cache)
        if meta.is_decode:
            tables, row_seq, lens = meta.gather_blocks.contiguous(), None, meta.context_lens
        elif meta.row_seq is not None and max(span.num_new for span in meta.spans) <= FUSED_MAX_NEW_TOKENS:
            unchunked = cache.dtype == torch.bfloat16 and not self.step.chunk_rows
            if unchunked and _attention_pairs(meta) >= FUSED_MAX_ATTENTION_PAIRS:
                return None
            tables, row_seq, lens = meta.block_table, meta.row_seq, meta.row_lens
        else:
            return None
        delta = embeddings  # a fresh tensor from F.embedding: the kernel writes the layers' output into it
        residual = torch.empty_like(delta)
        self.step.set_rows(delta, residual, cos, sin, meta.slots, tables, row_seq, lens)
        self.kernels.decode_layers(self.step)
        return delta, residual


def _attention_pairs(meta: AttentionMetadata) -> int:
    """(query, key) pairs the prompt chunks over a cached context attend over (fresh prompts' own keys are
    float32: the modules would gain nothing there). Spans of at most `FUSED_SHORT_SPAN` tokens (a token
    with its speculative drafts, a prompt's last few tokens) count for nothing: row by row they read
    the context as often as decode rows do, which is what the fused step is fastest at."""
    return sum(
        span.num_new * (span.num_cached + span.num_new)
        for span in meta.spans
        if span.num_new > FUSED_SHORT_SPAN and span.num_cached
    )


def _fast_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | OneDNNWeight | native.BF16Weight:
    """A copy of the head in `dtype`: on Ember's bf16 kernel or in oneDNN's layout where it can be."""
    bf16_kernel = dtype == torch.bfloat16 and weight.dtype == torch.float32
    if bf16_kernel and native.BF16Weight.runs(weight.device, weight.shape):
        return native.BF16Weight.pack(weight)
    copy = weight.to(dtype)
    return OneDNNWeight(copy) if OneDNNWeight.usable(copy.device, dtype) else copy
