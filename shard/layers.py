"""Tensor-parallel building blocks: linear layers, vocab-parallel embedding and head, norm, rotary.

Column-parallel layers split output features (no communication); row-parallel
layers split input features and all-reduce the partial sums, so an attention
or MLP block costs exactly one all-reduce per rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ember.shard import native
from ember.shard.dist import Group, all_gather, all_reduce
from ember.shard.gguf_blocks import Codes
from ember.shard.weights import Weights


def _held(weight):
    """A layer's weight as it holds it: a tensor as a frozen parameter, a packed weight as it is."""
    return torch.nn.Parameter(weight, requires_grad=False) if isinstance(weight, torch.Tensor) else weight


def _packable(codes: Codes) -> bool:
    return PackedWeight.unfit_reason("w4a8", codes.shape, torch.device("cpu")) is None


def _as_weight(codes: Codes):
    """A GGUF tensor's codes on Ember's packed kernel (`PackedWeight` w4a8), or as floats where the
    kernel cannot take its shape."""
    return PackedWeight.from_codes(codes) if _packable(codes) else codes.dequantize()


def _table(codes: Codes):
    """An embedding table or head kept as codes: `native.Q4Weight` (rows looked up one by one), or floats
    where the packing cannot take its shape."""
    return codes.packed() if _packable(codes) else codes.dequantize()


class ColumnParallelLinear(torch.nn.Module):
    """y = x W_rᵀ (+ b_r) with this rank's output rows; several weights may be packed (q|k|v)."""

    def __init__(self, weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = _held(weight)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def load(cls, weights: Weights, prefixes: list[str], bias: bool = False) -> ColumnParallelLinear:
        """Concatenate this rank's slice of each `prefix.weight` along the output dimension (a GGUF's
        quantized tensors as codes on the packed kernel, where the loader keeps them)."""
        if all(weights.serves_codes(f"{p}.weight") for p in prefixes):
            weight = _as_weight(Codes.cat([weights.codes_sharded(f"{p}.weight", dim=0) for p in prefixes]))
        else:
            weight = torch.cat([weights.get_sharded(f"{p}.weight", dim=0) for p in prefixes], dim=0)
        b = torch.cat([weights.get_sharded(f"{p}.bias", dim=0) for p in prefixes]) if bias else None
        return cls(weight, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias)


def _linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in the weight's dtype, returned in the input's.

    With float32 activations and bfloat16 weights (`--matmul-dtype bfloat16`) the
    matmul runs on bf16 inputs with float32 accumulation inside oneDNN, while the
    residual stream, norms, attention and logits stay float32. With equal dtypes
    both casts are no-ops. A `PackedWeight` (`--quantize`) multiplies bf16 inputs
    by its quantized weight; the bias is added after, in the input's dtype.
    """
    if isinstance(weight, (PackedWeight, OneDNNWeight, native.BF16Weight)):
        out = weight.linear(x)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if bias is None else out + bias.to(out.dtype)
    if x.dtype == weight.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def cast_weight(module: torch.nn.Module, dtype: torch.dtype, with_bias: bool) -> None:
    """Store a linear layer's weight in `dtype`: reordered for oneDNN once where it can (CPU), else
    as a plain tensor (and its bias too, when it enters the matmul)."""
    weight = module.weight.data
    bf16_kernel = dtype == torch.bfloat16 and weight.dtype == torch.float32
    if bf16_kernel and native.BF16Weight.runs(weight.device, weight.shape):
        # float32 activations times bf16 weights on Ember's AVX-512 BF16 kernel: oneDNN's arithmetic
        # (inputs rounded to bf16, float32 sums) without rounding the outputs to bf16, 20-25 % faster at
        # 32 rows and twice at one on SmolLM2's shapes, and the weight layout of the fused decode step.
        del module.weight
        module.weight = native.BF16Weight.pack(weight)
        return
    if OneDNNWeight.usable(weight.device, dtype):
        del module.weight  # the plain parameter goes; the bias stays and is added after, in full precision
        module.weight = OneDNNWeight(weight.to(dtype))
        return
    module.weight.data = weight.to(dtype)
    if with_bias and getattr(module, "bias", None) is not None:
        module.bias.data = module.bias.data.to(dtype)


class OneDNNWeight:
    """A linear weight reordered once into oneDNN's blocked layout (CPU, float32 or bfloat16).

    `F.linear` on a plain tensor leaves the weight in PyTorch's layout, so each
    call pays for a layout the GEMM does not read directly (MKL for float32, a
    reorder inside oneDNN for bf16). Reordering it once at load, as torch's own
    CPU compiler backend does, and calling oneDNN's linear directly gives the
    same products (bitwise in bf16 in our checks) faster on SmolLM2's shapes,
    all 30 layers' weights streaming from memory (`benchmarks/linear_layout.py`,
    results/linear_layout.md): float32 2.2-2.7x from 1 to 256 rows; bf16
    1.3-1.4x up to 32 rows (2.4x at 1 row in another run), 1.1x at 256. Same
    bytes as the plain weight.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.data = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    @staticmethod
    def usable(device: torch.device, dtype: torch.dtype) -> bool:
        if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
            return False
        if not torch.backends.mkldnn.is_available():
            return False
        return dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → [..., out] in this weight's dtype."""
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.data, None, "none", [], "")

    def dense(self) -> torch.Tensor:
        return self.data.to_dense()

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.finfo(self.dtype).bits // 8


QUANTIZE_KINDS = ("int8", "int4", "w4a8")
INT4_GROUP = 32  # input features per int4 scale/minimum: GGUF's Q4_1 block
# Steps of at most this many rows multiply with the packed weight; larger ones with its bf16 copy
# (SmolLM2 int4 vs oneDNN bf16, whole decode steps: 8.7 vs 14.4 ms at 1 row, 18.7 vs 21.7 at 8, even at 12).
PACKED_MAX_ROWS = 8


class PackedWeight:
    """A linear layer's weight stored quantized; activations enter its matmul in bfloat16 (CPU kernels).

    * `int8`: symmetric, one scale per output feature (torch's `_weight_int8pack_mm`).
    * `int4`: asymmetric, a scale and a minimum per group of 32 input features
      (torch's `_weight_int4pack_mm_for_cpu`).
    * `w4a8`: int4 weights as `int4` (float16 scale and minimum) times activations
      quantized per row and group of 32 to int8, on Ember's int8 kernel (AVX-512 VNNI or AVX2)
      (`kernels/matmul_q4.c`: llama.cpp's Q4_1 x Q8_1 scheme). 2-3x faster than bf16 at any
      row count and 0.75 bytes per weight, at a cost in precision that the other
      kinds do not pay (benchmarks/results/quality.md). This is the layout of GGUF's Q4_1
      blocks (w = d·q + m, q in 0..15, m the block's minimum, d its range / 15),
      so a model converted from a Q4_1 file keeps its 4-bit codes exactly; what
      changes is the rounding of d and m (bf16 here, fp16 in GGUF): ~0.3 % of a
      layer's largest weight on SmolLM2, as large as bf16 matmuls' own rounding.

    Weight-only: the step reads a half (int8) or a quarter (int4) of bf16's
    bytes, which is what decode at a few rows per step waits for on a CPU. With
    more rows the matmul is bound by arithmetic, where these kernels run at a
    third of oneDNN's bf16 GEMM (measured: 3072x576 at 64 rows, 1.26 vs 0.41 ms);
    so the dequantized weight is also kept in bf16, in oneDNN's layout (`dense`),
    and steps of more than `PACKED_MAX_ROWS` rows (prefills, larger batches) use
    it. This makes `--quantize` a speed option on CPU, not a memory one: 2.5
    bytes per weight for int4, 3 for int8.
    """

    compute_dtype = torch.bfloat16

    def __init__(
        self,
        kind: str,
        data: torch.Tensor | None,
        scales: torch.Tensor | None,
        shape: tuple[int, int],
        keep_dense: bool = True,
        q4: native.Q4Weight | None = None,
    ) -> None:
        self.kind = kind
        self.data = data
        self.scales = scales
        self.shape = shape
        self.q4 = q4
        self._kernels = native.kernels() if q4 is not None else None
        self.dense: OneDNNWeight | native.BF16Weight | torch.Tensor | None = None
        if keep_dense and q4 is None:
            back = self._read_back()
            if native.BF16Weight.runs(back.device, shape):
                self.dense = native.BF16Weight.pack(back)  # Ember's bf16 kernel: float32 in, float32 out
            elif OneDNNWeight.usable(back.device, back.dtype):
                self.dense = OneDNNWeight(back)
            else:
                self.dense = back

    @staticmethod
    def unfit_reason(kind: str, shape: tuple[int, ...], device: torch.device) -> str | None:
        """Why a weight of `shape` cannot be packed as `kind` (None: it can)."""
        if kind not in QUANTIZE_KINDS:
            return f"unknown quantization {kind!r} (choose from {', '.join(QUANTIZE_KINDS)})"
        if device.type != "cpu":
            return f"--quantize {kind} has CPU kernels only (device {device.type})"
        out_features, in_features = shape
        if kind in ("int4", "w4a8") and (out_features % 16 or in_features % INT4_GROUP):
            return (
                f"{kind} needs output features divisible by 16 and input features by {INT4_GROUP}, "
                f"got {out_features}x{in_features}"
            )
        if kind == "w4a8":
            kernels = native.kernels()
            if kernels is None or not kernels.q4:
                here = (
                    f"Ember's kernels are unavailable: {native.unavailable_reason()}"
                    if kernels is None
                    else "this CPU has neither AVX2 nor AVX-512 VNNI"
                )
                return (
                    f"w4a8 runs on Ember's C kernel, which needs a C compiler and an AVX2 or AVX-512 VNNI CPU "
                    f"({here}; use int4)"
                )
        return None

    @classmethod
    def quantize(cls, weight: torch.Tensor, kind: str, keep_dense: bool = True) -> PackedWeight:
        """Pack `weight` [out, in]; `keep_dense=False`: no bf16 copy (the packed kernel for any rows)."""
        reason = cls.unfit_reason(kind, tuple(weight.shape), weight.device)
        if reason:
            raise ValueError(reason)
        w = weight.detach().float()
        if kind == "int8":
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            return cls(kind, q.contiguous(), scale.to(cls.compute_dtype), tuple(w.shape), keep_dense)
        out_features, in_features = w.shape
        groups = w.view(out_features, in_features // INT4_GROUP, INT4_GROUP)
        low = groups.amin(dim=-1)
        scale = ((groups.amax(dim=-1) - low) / 15.0).clamp(min=1e-12)
        if kind == "w4a8":  # Ember's kernel keeps d and m in float16: the codes are chosen against those
            low, scale = low.half().float(), scale.clamp(min=1e-7).half().float()
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        if kind == "w4a8":  # Ember's int8 kernel: no dense copy (it beats bf16 at any rows)
            return cls(
                kind, None, None, tuple(w.shape), q4=native.Q4Weight.pack(q.view(out_features, in_features), scale, low)
            )
        packed = torch._convert_weight_to_int4pack_for_cpu(q.view(out_features, in_features), 1)
        # The kernel computes (q - 8)·scale + zero, so zero is the value of q = 8: m + 8·d.
        scales_and_zeros = torch.stack([scale, low + 8.0 * scale], dim=-1).transpose(0, 1).contiguous()
        return cls(kind, packed, scales_and_zeros.to(cls.compute_dtype), tuple(w.shape), keep_dense)

    @classmethod
    def from_codes(cls, codes: Codes) -> PackedWeight:
        """A GGUF tensor's codes as they are, on Ember's int8 kernel (`w4a8`; 5-bit codes for the 5-bit
        types, 8-bit ones for Q6_K and Q8_0): no requantization (`gguf_blocks`)."""
        return cls("w4a8", None, None, codes.shape, q4=codes.packed())

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → [..., out] in bfloat16 (float32 from Ember's int4 and bf16 kernels)."""
        if self.q4 is not None:
            if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
                return self._kernels.q4_linear(x, self.q4)
            flat = x.reshape(-1, self.shape[1]).float().contiguous()
            return self._kernels.q4_linear(flat, self.q4).view(*x.shape[:-1], self.shape[0])
        if isinstance(self.dense, native.BF16Weight) and x.numel() > PACKED_MAX_ROWS * self.shape[1]:
            return self.dense.linear(x)  # rounds x to bf16 itself, as the casts below would
        flat = x.reshape(-1, self.shape[1]).to(self.compute_dtype)
        if flat.shape[0] > PACKED_MAX_ROWS and self.dense is not None:
            out = self.dense.linear(flat) if isinstance(self.dense, OneDNNWeight) else F.linear(flat, self.dense)
        else:
            out = self._packed_mm(flat)
        return out.view(*x.shape[:-1], self.shape[0])

    def _packed_mm(self, flat: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            return torch._weight_int8pack_mm(flat, self.data, self.scales)
        return torch._weight_int4pack_mm_for_cpu(flat, self.data, INT4_GROUP, self.scales)

    def _read_back(self) -> torch.Tensor:
        """[out, in] bf16: the weight as the packed kernel multiplies it, in blocks of 1024 inputs."""
        eye = torch.eye(self.shape[1], dtype=self.compute_dtype, device=self.data.device)
        return torch.cat([self._packed_mm(rows) for rows in eye.split(1024)]).t().contiguous()

    def dequantize(self) -> torch.Tensor:
        """The weight this packing stands for: read back through torch's kernel (so rounded to bf16),
        or d·q + m in float32 for Ember's int4 kernel."""
        if self.q4 is not None:
            return self.q4.dequantize()
        return self._read_back().float()

    @property
    def nbytes(self) -> int:
        if self.q4 is not None:
            return self.q4.nbytes
        dense = (
            0
            if self.dense is None
            else (
                self.dense.nbytes
                if isinstance(self.dense, (OneDNNWeight, native.BF16Weight))
                else self.dense.numel() * 2
            )
        )
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales)) + dense


def pack_weight(module: torch.nn.Module, kind: str) -> str | None:
    """Replace a linear layer's weight by its `PackedWeight`; returns why it could not (kept as it was).
    A weight packed at load (a GGUF's codes) stays as it is."""
    if isinstance(module.weight, PackedWeight):
        return None
    weight = module.weight.data
    reason = PackedWeight.unfit_reason(kind, tuple(weight.shape), weight.device)
    if reason:
        return reason
    packed = PackedWeight.quantize(weight, kind)
    del module.weight  # the float parameter goes; the packed weight is a plain attribute
    module.weight = packed
    return None


def linear_path(weight) -> tuple[str, str]:
    """(the path a linear layer's weight multiplies on, why): what `_linear` dispatches on, decided at load
    by `cast_weight` / `pack_weight` (native.py's docstring lists every path)."""
    if isinstance(weight, native.BF16Weight):
        return "bf16 weights on Ember's AVX-512 BF16 kernel (float32 sums)", "bf16 matmuls on a CPU with AVX-512 BF16"
    if isinstance(weight, OneDNNWeight):
        if weight.dtype == torch.bfloat16:
            return "oneDNN, bf16 weights in its blocked layout", _why_not_bf16_kernel(weight.shape)
        return f"oneDNN, {_dtype_name(weight.dtype)} weights in its blocked layout", "CPU: reordered once at load"
    if isinstance(weight, PackedWeight):
        if weight.q4 is not None:
            isa = weight._kernels.q4_isa
            return (
                f"w4a8: int4 codes x int8 activations on Ember's int8 kernel ({isa})",
                f"--quantize w4a8 on a CPU with {isa}",
            )
        beyond = linear_path(weight.dense)[0] if weight.dense is not None else f"torch's {weight.kind} kernel"
        return (
            f"{weight.kind} on torch's kernel up to {PACKED_MAX_ROWS} rows, beyond: {beyond}",
            f"--quantize {weight.kind}: torch's packed kernel wins at a few rows, a bf16 GEMM beyond",
        )
    dtype = _dtype_name(weight.dtype)
    if weight.device.type != "cpu":
        return f"torch F.linear, {dtype} weights", f"on {weight.device.type}: Ember's layouts and kernels are CPU's"
    if isinstance(weight, torch.Tensor) and not OneDNNWeight.usable(weight.device, weight.dtype):
        return f"torch F.linear, {dtype} weights", f"oneDNN does not take {dtype} weights here"
    return f"torch F.linear, {dtype} weights", "kept as loaded"


def _why_not_bf16_kernel(shape: tuple[int, int]) -> str:
    problem = native.bf16_kernel_problem()
    if problem:
        return f"bf16 matmuls: {problem}"
    return f"bf16 matmuls, but Ember's bf16 kernel takes no {shape[0]}x{shape[1]} weight (out % 16, in % 32)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class RowParallelLinear(torch.nn.Module):
    """y = all_reduce(x_r W_rᵀ) + b: input features are split, the bias is added once after the sum."""

    def __init__(self, weight, bias: torch.Tensor | None, group: Group) -> None:
        super().__init__()
        self.weight = _held(weight)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.group = group

    @classmethod
    def load(cls, weights: Weights, prefix: str, group: Group, bias: bool = False) -> RowParallelLinear:
        name = f"{prefix}.weight"
        if weights.serves_codes(name):
            weight = _as_weight(weights.codes_sharded(name, dim=1))
        else:
            weight = weights.get_sharded(name, dim=1)
        b = weights.get(f"{prefix}.bias") if bias else None
        return cls(weight, b, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _linear(x, self.weight)
        out = all_reduce(out, self.group)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out


class VocabParallelEmbedding(torch.nn.Module):
    """Each rank holds a contiguous vocabulary range; ids outside it read zeros, then all-reduce."""

    def __init__(self, weight, vocab_size: int, group: Group, dtype: torch.dtype | None = None) -> None:
        """`weight`: [vocab part, hidden] floats, or a `native.Q4Weight` (a GGUF's quantized table,
        looked up row by row into `dtype`)."""
        super().__init__()
        self.weight = _held(weight)
        self.vocab_size = vocab_size
        self.group = group
        self.start = group.rank * weight.shape[0]
        self.stop = self.start + weight.shape[0]
        self.dtype = weight.dtype if isinstance(weight, torch.Tensor) else (dtype or torch.float32)
        self.device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")

    @classmethod
    def load(cls, weights: Weights, name: str, group: Group) -> VocabParallelEmbedding:
        vocab_size = weights.shape(name)[0]
        if weights.serves_codes(name):
            table = _table(weights.codes_sharded(name, dim=0, allow_padding=True))
            return cls(table, vocab_size, group, weights.dtype)
        return cls(weights.get_sharded(name, dim=0, allow_padding=True), vocab_size, group)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, native.Q4Weight):
            return self.weight.rows(ids).view(*ids.shape, -1).to(self.dtype)
        return F.embedding(ids, self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.is_trivial:
            return self._lookup(ids)
        outside = (ids < self.start) | (ids >= self.stop)
        local = (ids - self.start).masked_fill(outside, 0)
        out = self._lookup(local).masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(out, self.group)


class ParallelLMHead(torch.nn.Module):
    """Vocab-sharded output projection; logits of all ranks are all-gathered and unpadded."""

    def __init__(self, weight, vocab_size: int, group: Group) -> None:
        """`weight`: [vocab part, hidden] floats, or a `native.Q4Weight` (a GGUF's quantized head)."""
        super().__init__()
        self.weight = _held(weight)
        self.vocab_size = vocab_size
        self.group = group

    @classmethod
    def load(cls, weights: Weights, name: str, group: Group) -> ParallelLMHead:
        """`name` is `lm_head.weight`, or `model.embed_tokens.weight` for tied embeddings."""
        vocab_size = weights.shape(name)[0]
        if weights.serves_codes(name):
            return cls(_table(weights.codes_sharded(name, dim=0, allow_padding=True)), vocab_size, group)
        return cls(weights.get_sharded(name, dim=0, allow_padding=True), vocab_size, group)

    @classmethod
    def tied(cls, embedding: VocabParallelEmbedding) -> ParallelLMHead:
        """Share the embedding's storage (tied embeddings: no second copy in memory)."""
        weight = embedding.weight
        return cls(weight.data if isinstance(weight, torch.Tensor) else weight, embedding.vocab_size, embedding.group)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The head's rows `ids` as floats (the candidates `logits` rescores)."""
        if isinstance(self.weight, native.Q4Weight):
            return self.weight.rows(ids)
        return self.weight.index_select(0, ids)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, native.Q4Weight):
            logits = native.kernels().q4_linear(hidden.float().contiguous(), self.weight)
        else:
            logits = F.linear(hidden, self.weight)
        if self.group.is_trivial:
            return logits
        return all_gather(logits, self.group, dim=-1)[..., : self.vocab_size]


class RMSNorm(torch.nn.Module):
    """Root-mean-square norm computed in float32, as the reference implementation does."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    @classmethod
    def load(cls, weights: Weights, name: str, eps: float) -> RMSNorm:
        return cls(weights.get(name), eps)

    def add_and_norm(self, delta: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(r), r) with r = residual + delta (r = delta when residual is None)."""
        kernels = native.kernels() if delta.device.type == "cpu" else None
        if kernels is not None and kernels.fits(delta, self.weight) and (residual is None or kernels.fits(residual)):
            return kernels.rms_norm(delta, self.weight, self.eps, residual)
        summed = delta if residual is None else residual + delta
        return self(summed), summed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused kernel instead of six; the same float32 arithmetic.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x · (1 + w), all in float32, rounded to the activations' dtype once at the end
    (Llama rounds the normalized x first). Holds 1 + w in float32, added once at load, so float32
    activations take the same fused kernels as `RMSNorm`."""

    @classmethod
    def load(cls, weights: Weights, name: str, eps: float) -> OffsetRMSNorm:
        return cls(weights.get(name, dtype=torch.float32) + 1.0, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def rope_parameters(config: dict) -> dict:
    """Merge the rope spellings found in configs: `rope_theta` + `rope_scaling`, or transformers-5 `rope_parameters`."""
    params: dict = {}
    params.update(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return params


def inverse_frequencies(params: dict, head_dim: int, max_position_embeddings: int) -> torch.Tensor:
    """Rotary inverse frequencies for default, linear and llama3 rope types (float32)."""
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(params["factor"])
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, params, max_position_embeddings)
    raise NotImplementedError(f"rope type {kind!r} is not supported by Ember's model code")


def _llama3_frequencies(inv_freq: torch.Tensor, params: dict, max_pos: int) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, a smooth blend in between."""
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params.get("original_max_position_embeddings", max_pos))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin table indexed by absolute position; grows on demand (long-context configs stay cheap).

    The sin table carries the rotation's sign (its first half negated), so applying
    the rotation is a swap of halves and one multiply-add (see `apply_rotary`).
    """

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype, device: torch.device, initial_len: int = 4096):
        super().__init__()
        self.inv_freq = inv_freq.to(device)
        self.dtype = dtype
        self.cos = torch.empty(0, device=device)
        self.sin = torch.empty(0, device=device)
        self._build(initial_len)

    @classmethod
    def from_config(cls, config: dict, head_dim: int, dtype: torch.dtype, device: torch.device) -> RotaryEmbedding:
        max_pos = int(config.get("max_position_embeddings", 4096))
        inv_freq = inverse_frequencies(rope_parameters(config), head_dim, max_pos)
        return cls(inv_freq, dtype, device, initial_len=min(max_pos, 8192))

    def _build(self, length: int) -> None:
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        self.cos = torch.cat([freqs, freqs], dim=-1).cos().to(self.dtype)
        self.sin = torch.cat([-freqs, freqs], dim=-1).sin().to(self.dtype)  # sin(-f) = -sin(f), exactly

    def cos_sin(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, rot_dim] cos and signed sin for `positions`; `max_position` (a host int) avoids a device sync."""
        if max_position >= self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], max_position + 1))
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] along the last dimension, in one copy."""
    half = x.shape[-1] // 2
    return x.unflatten(-1, (2, half)).flip(-2).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim features of `x` [T, heads, head_dim] (half-split layout, as HF).

    `sin` is the signed table of `RotaryEmbedding`: x·cos + [x2, x1]·[-sin, sin]
    equals HF's x·cos + [-x2, x1]·sin.
    """
    rot_dim = cos.shape[-1]
    if rot_dim == x.shape[-1]:
        return torch.addcmul(x * cos, _swap_halves(x), sin)
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat([torch.addcmul(rot * cos, _swap_halves(rot), sin), rest], dim=-1)
