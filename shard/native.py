"""Ember's C kernels for the CPU (`kernels/*.c`): built once per machine, loaded through ctypes.

Which kernel runs when
----------------------
Each path below is fixed at load (where a step's row count picks between two, the rule is), in
`layers.cast_weight` / `pack_weight` and `LlamaForCausalLM.cast_matmuls` / `quantize`;
`LlamaForCausalLM.kernel_paths` lists them, and the shard logs one line per kind of layer at load
("decoder linears: ...", "fused step: ...", "lm head: ...") with the reason.

* Decoder linears (qkv, o_proj, gate_up, down; one path per weight, `layers.linear_path` names it):
  float32 on CPU: oneDNN's linear on the weight reordered once into its blocked layout (`OneDNNWeight`,
  torch's, not this library). `--matmul-dtype bfloat16` with AVX-512 BF16: `bf16_linear`
  (matmul_bf16.c) on `BF16Weight` tiles, activations rounded to bf16, float32 sums; with AMX, or without AVX-512 BF16
  (or a shape it does not take): oneDNN in bf16. `--quantize int8|int4`: torch's packed kernels up to
  `layers.PACKED_MAX_ROWS` rows, a bf16 copy (bf16 kernel or oneDNN) beyond. `--quantize w4a8` (AVX-512 VNNI or
  AVX2): `q4_linear` (matmul_q4.c), int4 codes x int8 activations, at any row count: vpdpbusd tiles (AVX2:
  vpmaddubsw, the same integer sums and float steps), or from
  `AMX_MIN_ROWS` rows AMX int8 tiles where the CPU has AMX (the same integer sums and float steps, so the same
  bits). Off CPU: torch's F.linear.
* Fused step: w4a8 weights, or bf16 weights on the bf16 kernel, with float32 activations, world size 1,
  silu and no biases: `decode_layers` (fused_step.c) runs every decoder layer of a step in one call
  (decode steps, and steps whose prompt chunks are at most `llama.FUSED_MAX_NEW_TOKENS` long);
  `FusedDecode.build` says why a model does not fuse. Other steps go layer by layer, below.
* Layer by layer, float32 on CPU: `rms_norm_f32` (with the residual add), `rotary_f32`, `silu_mul_f32`,
  `kv_store` (the step's K/V into the paged cache, float32 or bf16) and, for decode attention,
  `paged_decode_f32` / `_bf16` (attention.c: the cache read in place through the block table). A prompt
  chunk over a cached context in a bf16 cache: `paged_prefill_bf16` (prefill.c) on AMX bf16 tiles where
  the CPU and Linux allow them (prefill_amx.c), else on AVX2 or AVX-512 FMAs (prefill_fma.c) (`prefill_fits`);
  other prefill attention is torch's SDPA; other dtypes and devices take torch's ops.
* LM head: w4a8: 8-bit codes on `q4_linear`; int4: torch's int4 kernel up to `llama.PACKED_HEAD_MAX_ROWS`
  rows, its bf16 copy beyond; `--matmul-dtype bfloat16`: a bf16 copy (bf16 kernel or oneDNN); each row's 16 best
  candidates (`topk_rows`, sampling.c) are then rescored in the model's dtype. Otherwise torch's F.linear.
* Sampling: batches that are all greedy and ask for no alternatives: `argmax_lse` (sampling.c).

The interface
-------------
`ENTRY_POINTS` declares every entry point with its named, typed parameters. Each returns a status: 0, or
an `EMBER_E_*` code (kernels/ember.h) that the wrappers raise as `NativeError`, naming the entry point
and the check that failed (`ember_status_message`). `decode_layers` takes one `DecodeStep` (the model's
shapes, set at load; the cache's, set when it is allocated; the step's tensors) pointing at a table of
`DecodeLayer` (each layer's norm weights, its four projections as `LinearWeights`, its K/V cache and
window): ctypes mirrors of ember.h's structs, whose sizes, field names and offsets `check_layout`
compares with the library's (`ember_layout`) at load; a library that differs is refused.

The build
---------
Every `.c` file of `kernels/` is compiled together, with the machine's C compiler (`$CC`, else `cc`), at
first use, for the CPU it runs on (`-march=native`) and with OpenMP, into one shared library in the cache
(`$EMBER_CACHE/kernels`, keyed by every source and header, the flags and the CPU). The OpenMP runtime is
torch's own (`libgomp.so.1` is already loaded when torch is), so the kernels share torch's threads rather
than adding a second pool.

Without a compiler, or with `EMBER_NATIVE=0`, `kernels()` returns None (`unavailable_reason` says why)
and the callers keep their torch paths: the kernels are a speed-up, never a requirement.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ember import settings

log = logging.getLogger(__name__)

KERNELS_DIR = Path(__file__).with_name("kernels")
# -fno-trapping-math: a float comparison in a loop (a clamp, a select) may then be if-converted, which is what
# lets `exp_neg` and the rows' loops vectorize at all; it changes no result (no reassociation, no fast-math).
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F32 = ctypes.c_float

_lock = threading.Lock()
_loaded: Kernels | None | bool = False  # False: not tried yet
_why_unavailable: str | None = None


class NativeError(RuntimeError):
    """A kernel refused a call or failed (`status`, an EMBER_E_* code named `name`, says which check), or
    the library does not match this module's declarations (`status` None)."""

    def __init__(
        self, message: str, entry: str | None = None, status: int | None = None, name: str | None = None
    ) -> None:
        super().__init__(message)
        self.entry = entry
        self.status = status
        self.name = name


# --- the structs decode_layers reads: mirrors of kernels/ember.h, checked against it at load ------------


class LinearWeights(ctypes.Structure):
    """`ember_linear`: one projection's weight, w4a8's packed codes with their scales d and minimums m
    (`Q4Weight`), or bf16 weights' packed tiles (`BF16Weight`, d and m NULL)."""

    c_type = "ember_linear"
    _fields_ = [("packed", _P), ("d", _P), ("m", _P)]

    @classmethod
    def of(cls, weight: Q4Weight | BF16Weight) -> LinearWeights:
        if isinstance(weight, Q4Weight):
            m = weight.m.data_ptr() if weight.m is not None else None
            return cls(weight.packed.data_ptr(), weight.d.data_ptr(), m)
        if isinstance(weight, BF16Weight):
            return cls(weight.packed.data_ptr(), None, None)
        raise TypeError(f"decode_layers takes Q4Weight or BF16Weight projections, not {type(weight).__name__}")


class DecodeLayer(ctypes.Structure):
    """`ember_decode_layer`: one decoder layer of decode_layers' table, filled once at load (the cache
    addresses when the cache is allocated). The caller keeps the tensors behind these addresses alive."""

    c_type = "ember_decode_layer"
    _fields_ = [
        ("input_norm", _P),
        ("post_norm", _P),  # RMSNorm weights [hidden] float32
        ("qkv", LinearWeights),
        ("o_proj", LinearWeights),
        ("gate_up", LinearWeights),
        ("down", LinearWeights),
        ("k_cache", _P),
        ("v_cache", _P),  # the layer's flat caches [slots, kv_heads * head_dim]
        ("window", _I64),  # sliding window in keys (0: none)
    ]


class DecodeStep(ctypes.Structure):
    """`ember_decode_step`: decode_layers' arguments. The model's fields are set once at load, the cache's
    when it is allocated, the step's by `set_rows` before each call."""

    c_type = "ember_decode_step"
    _fields_ = [
        # the model
        ("layers", ctypes.POINTER(DecodeLayer)),
        ("num_layers", _I64),
        ("hidden", _I64),
        ("heads", _I64),
        ("kv_heads", _I64),
        ("head_dim", _I64),
        ("inter", _I64),
        ("eps", _F32),
        ("scale", _F32),  # the RMSNorms' epsilon; the attention's scale (head_dim ** -0.5)
        ("bf16_weights", ctypes.c_int32),  # 1: every projection bf16 (BF16Weight); 0: w4a8 (Q4Weight)
        # the cache
        ("bf16_cache", ctypes.c_int32),
        ("block_size", _I64),
        # the step
        ("rows", _I64),
        ("rot", _I64),
        ("table_width", _I64),
        ("delta", _P),
        ("residual", _P),  # [rows, hidden] float32: in the embeddings; out the output, residual
        ("cos", _P),
        ("sin", _P),  # [rows, rot] float32
        ("slots", _P),
        ("tables", _P),
        ("row_seq", _P),
        ("lens", _P),  # int64: [rows], [seqs, width], [rows]
        ("chunk_rows", _I64),  # longer prompt runs attend as chunks (AMX tiles or FMAs); 0: none
        ("threads", ctypes.c_int32),
    ]

    def set_rows(
        self,
        delta: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        tables: torch.Tensor,
        row_seq: torch.Tensor | None,
        lens: torch.Tensor,
    ) -> None:
        """The step's tensors (contiguous; int64 indices), which the caller keeps alive through the call.
        Row r is a token of sequence `row_seq[r]` (None: of sequence r, one token each), whose block
        table is `tables[row_seq[r]]`, and attends over `lens[r]` keys of it."""
        self.rows = delta.shape[0]
        self.delta, self.residual = delta.data_ptr(), residual.data_ptr()
        self.cos, self.sin, self.rot = cos.data_ptr(), sin.data_ptr(), cos.shape[-1]
        self.slots, self.tables, self.table_width = slots.data_ptr(), tables.data_ptr(), tables.shape[1]
        self.row_seq = row_seq.data_ptr() if row_seq is not None else None
        self.lens = lens.data_ptr()
        self.threads = torch.get_num_threads()


MIRRORS = (LinearWeights, DecodeLayer, DecodeStep)  # checked against the library's layouts at load

# Every entry point of the library (kernels/*.c) with its parameters, as C declares them. Each returns a
# status (0: done; else an EMBER_E_* code, raised as NativeError), but the *_supported probes (1: built
# with the instructions their kernels need).
# The attention kernels' shape of the heads and the cache, in their parameter order.
_HEADS = (
    ("heads", _I64),
    ("kv_heads", _I64),
    ("dim", _I64),
    ("block_size", _I64),
    ("window", _I64),
    ("scale", _F32),
)
_PAGED_DECODE = (
    ("q", _P),
    ("q_stride", _I64),
    ("k", _P),
    ("v", _P),
    ("tables", _P),
    ("table_width", _I64),
    ("lens", _P),
    ("batch", _I64),
    *_HEADS,
    ("out", _P),
    ("threads", _INT),
)
ENTRY_POINTS: dict[str, tuple[tuple[str, type], ...]] = {
    # attention.c
    "paged_decode_f32": _PAGED_DECODE,
    "paged_decode_bf16": _PAGED_DECODE,
    "attention_amx": (("on", _INT),),
    # prefill.c, prefill_amx.c
    "prefill_amx_supported": (),
    "prefill_chunks_supported": (),
    "paged_prefill_bf16": (
        ("q", _P),
        ("q_stride", _I64),
        ("k", _P),
        ("v", _P),
        ("table", _P),
        ("cached", _I64),
        ("rows", _I64),
        *_HEADS,
        ("out", _P),
        ("out_stride", _I64),
        ("threads", _INT),
    ),
    # elementwise.c
    "rms_norm_f32": (
        ("x", _P),
        ("delta", _P),
        ("h", _P),
        ("w", _P),
        ("eps", _F32),
        ("out", _P),
        ("rows", _I64),
        ("dim", _I64),
        ("threads", _INT),
    ),
    "silu_mul_f32": (("gu", _P), ("out", _P), ("rows", _I64), ("inter", _I64), ("threads", _INT)),
    "rotary_f32": (
        ("x", _P),
        ("rows", _I64),
        ("row_stride", _I64),
        ("heads", _I64),
        ("dim", _I64),
        ("cos", _P),
        ("sin", _P),
        ("rot", _I64),
        ("threads", _INT),
    ),
    "kv_store": (
        ("k", _P),
        ("k_stride", _I64),
        ("v", _P),
        ("v_stride", _I64),
        ("slots", _P),
        ("rows", _I64),
        ("width", _I64),
        ("k_cache", _P),
        ("v_cache", _P),
        ("bf16", _INT),
    ),
    # matmul_bf16.c, matmul_q4.c
    "bf16_supported": (),
    "bf16_linear": (("x", _P), ("rows", _I64), ("k", _I64), ("w", _P), ("n", _I64), ("out", _P), ("threads", _INT)),
    "q4_supported": (),
    "q4_amx": (("min_rows", _I64),),
    "q4_linear": (
        ("x", _P),
        ("rows", _I64),
        ("k", _I64),
        ("packed", _P),
        ("d", _P),
        ("m", _P),
        ("n", _I64),
        ("out", _P),
        ("bits", _INT),
        ("threads", _INT),
    ),
    # fused_step.c
    "decode_layers": (("step", ctypes.POINTER(DecodeStep)),),
    # sampling.c
    "argmax_lse": (("x", _P), ("rows", _I64), ("vocab", _I64), ("ids", _P), ("lse", _P), ("threads", _INT)),
    "topk_rows": (("x", _P), ("rows", _I64), ("vocab", _I64), ("k", _I64), ("idx", _P), ("threads", _INT)),
}


def _type_abi(lib: ctypes.CDLL) -> None:
    """Type abi.c's functions: the statuses' text and the structs' layouts."""
    try:
        for name, restype, argtypes in (
            ("ember_status_name", ctypes.c_char_p, [_INT]),
            ("ember_status_message", ctypes.c_char_p, [_INT]),
            ("ember_layout", _I64, [ctypes.c_char_p, ctypes.c_char_p]),
            ("ember_layout_field", ctypes.c_char_p, [ctypes.c_char_p, _I64]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except AttributeError as err:
        raise NativeError(f"not Ember's kernels, or built from other sources: {err}") from None


def check_layout(lib: ctypes.CDLL, mirror: type[ctypes.Structure]) -> None:
    """Refuse (NativeError) a library whose struct `mirror.c_type` differs from its ctypes mirror: in
    size, in its fields' names and order, or in any field's offset."""
    c_type, ours = mirror.c_type, f"native.{mirror.__name__}"
    size = lib.ember_layout(c_type.encode(), None)
    if size < 0:
        raise NativeError(f"the library declares no struct {c_type} ({ours} mirrors it)")
    if size != ctypes.sizeof(mirror):
        raise NativeError(
            f"struct {c_type} is {size} bytes in the library but {ctypes.sizeof(mirror)} in {ours}: "
            "kernels/ember.h and native.py must declare the same fields"
        )
    theirs, i = [], 0
    while (name := lib.ember_layout_field(c_type.encode(), i)) is not None:
        theirs.append(name.decode())
        i += 1
    names = [field[0] for field in mirror._fields_]
    if theirs != names:
        raise NativeError(f"struct {c_type} has fields {theirs} in the library but {names} in {ours}")
    for name in names:
        offset = lib.ember_layout(c_type.encode(), name.encode())
        if offset != getattr(mirror, name).offset:
            raise NativeError(
                f"struct {c_type}: field {name} is at byte {offset} in the library but "
                f"{getattr(mirror, name).offset} in {ours}"
            )


class Kernels:
    """The loaded library with typed entry points (`ENTRY_POINTS`), its structs checked (`MIRRORS`)."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        _type_abi(lib)
        for mirror in MIRRORS:
            check_layout(lib, mirror)
        self.lib = lib
        self.path = path
        for name, params in ENTRY_POINTS.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise NativeError(
                    f"the library has no entry point {name} (declared in native.ENTRY_POINTS)", name
                ) from None
            fn.restype = ctypes.c_int
            fn.argtypes = [kind for _, kind in params]
            setattr(self, f"_{name}", fn)
        self._decode = {torch.float32: self._paged_decode_f32, torch.bfloat16: self._paged_decode_bf16}
        # the int8 kernels (w4a8, the fused step): on AVX-512 VNNI, or on AVX2 (the same numbers)
        self.q4_isa = Q4_ISAS.get(self._q4_supported())
        self.q4 = self.q4_isa is not None
        self.use_amx(AMX_MIN_ROWS)  # sets amx_min_rows: 0 where AMX tiles are off (no AMX, or not granted)
        self.bf16 = bool(self._bf16_supported())  # built with AVX-512 BF16
        self.prefill_amx = bool(self._prefill_amx_supported())  # built with AMX bf16, and granted
        # prompt chunks over a bf16 cache (paged_prefill_bf16, the fused step's chunks): AMX tiles, else FMAs
        self.prefill_chunks = bool(self._prefill_chunks_supported())
        self.use_amx_attention(True)

    def use_amx_attention(self, on: bool) -> bool:
        """Decode attention over a bf16 cache (64-wide heads) on AMX bf16 tiles where this build and process
        have them (on by default); returns whether it is. About float32's numbers either way (2e-5)."""
        self.decode_amx = bool(self._attention_amx(int(on)))
        return self.decode_amx

    def use_amx(self, min_rows: int) -> int:
        """Run w4a8 matmuls of `min_rows` rows or more on AMX int8 tiles (0: never); returns the row count
        in force, 0 where this build or process has no AMX. Either path gives the same bits."""
        granted = self._q4_amx(max(min_rows, 0))  # 0 rows switches the tiles off
        self.amx_min_rows = min_rows if granted else 0
        return self.amx_min_rows

    def error(self, entry: str, status: int, detail: str = "") -> NativeError:
        """The NativeError for `status` returned by `entry`: which check failed, in the library's words."""
        name, message = self.lib.ember_status_name(status), self.lib.ember_status_message(status)
        if name is None:
            return NativeError(f"{entry} failed with status {status}, which the library does not name", entry, status)
        detail = f" [{detail}]" if detail else ""
        return NativeError(
            f"{entry} failed: {message.decode()} ({name.decode()}){detail}", entry, status, name.decode()
        )

    def argmax_lse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of x [rows, vocab] (float32, contiguous): the first index of its maximum (int64) and
        log(sum(exp(row))) (float32): a greedy choice and its logprob without a log_softmax over the row."""
        rows, vocab = x.shape
        ids = torch.empty(rows, dtype=torch.long)
        lse = torch.empty(rows, dtype=torch.float32)
        self._argmax_lse(x.data_ptr(), rows, vocab, ids.data_ptr(), lse.data_ptr(), torch.get_num_threads())
        return ids, lse

    def topk_indices(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """[rows, k] int64: the indices of each row's k largest values of x [rows, vocab] (float32,
        contiguous), in no particular order (k <= 256)."""
        rows, vocab = x.shape
        idx = torch.empty(rows, k, dtype=torch.long)
        status = self._topk_rows(x.data_ptr(), rows, vocab, k, idx.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise self.error("topk_rows", status, f"k={k}, vocab={vocab}")
        return idx

    def decode_layers(self, step: DecodeStep) -> None:
        """Every decoder layer of a step of w4a8 (or bf16, `step.bf16_weights`) weights in one call
        (`decode_layers`, fused_step.c): `step.delta` enters with the embeddings and leaves with the last
        layer's output, `step.residual` leaves with the residual stream before it."""
        status = self._decode_layers(ctypes.byref(step))
        if status != 0:
            raise self.error("decode_layers", status, f"{step.rows} rows, {step.num_layers} layers")

    def bf16_linear(self, x: torch.Tensor, weight: BF16Weight) -> torch.Tensor:
        """[rows, n] float32: x [rows, k] (float32, contiguous) rounded to bf16, times the packed weight."""
        rows, k = x.shape
        n = weight.shape[0]
        out = torch.empty(rows, n, dtype=torch.float32)
        status = self._bf16_linear(
            x.data_ptr(), rows, k, weight.packed.data_ptr(), n, out.data_ptr(), torch.get_num_threads()
        )
        if status != 0:
            raise self.error("bf16_linear", status, f"x {tuple(x.shape)}, weight {weight.shape}")
        return out

    def kv_store(
        self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> bool:
        """Write k, v [T, KVH, D] (float32, heads contiguous in each row) into slots of the flat caches
        (float32 or bf16, contiguous); False (nothing written) when the layouts do not fit."""
        width = k.shape[1] * k.shape[2]
        if (
            k.dtype != torch.float32
            or v.dtype != torch.float32
            or k_cache.dtype not in self._decode
            or k.stride(2) != 1
            or k.stride(1) != k.shape[2]
            or v.stride(2) != 1
            or v.stride(1) != v.shape[2]
            or not k_cache.is_contiguous()
            or not v_cache.is_contiguous()
            or slots.dtype != torch.long
        ):
            return False
        self._kv_store(
            k.data_ptr(),
            k.stride(0),
            v.data_ptr(),
            v.stride(0),
            slots.data_ptr(),
            k.shape[0],
            width,
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            int(k_cache.dtype == torch.bfloat16),
        )
        return True

    @staticmethod
    def fits(*tensors: torch.Tensor) -> bool:
        """The elementwise kernels take contiguous float32 CPU tensors."""
        for t in tensors:
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                return False
        return True

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(r) * weight, r) with r = x + residual (or x): rows of the last dimension."""
        dim = x.shape[-1]
        out = torch.empty_like(x)
        summed = torch.empty_like(x) if residual is not None else x
        self._rms_norm_f32(
            x.data_ptr(),
            residual.data_ptr() if residual is not None else None,
            summed.data_ptr() if residual is not None else None,
            weight.data_ptr(),
            eps,
            out.data_ptr(),
            x.numel() // dim,
            dim,
            torch.get_num_threads(),
        )
        return out, summed

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for `gate_up` = [gate | up] along the last dimension."""
        inter = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], inter)
        self._silu_mul_f32(
            gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter), inter, torch.get_num_threads()
        )
        return out

    def q4_linear(self, x: torch.Tensor, weight: Q4Weight) -> torch.Tensor:
        """x [rows, k] float32 contiguous -> [rows, n] float32 (activations quantized per 32 to int8)."""
        n, k = weight.shape
        rows = x.shape[0]
        out = torch.empty(rows, n, dtype=torch.float32)
        status = self._q4_linear(
            x.data_ptr(),
            rows,
            k,
            weight.packed.data_ptr(),
            weight.d.data_ptr(),
            weight.m.data_ptr() if weight.m is not None else None,
            n,
            out.data_ptr(),
            weight.bits,
            torch.get_num_threads(),
        )
        if status != 0:
            raise self.error("q4_linear", status, f"x {tuple(x.shape)}, weight {weight.shape}, {weight.bits} bits")
        return out

    def rotary_(self, rows: torch.Tensor, heads: int, dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate, in place, the first `heads` heads of each row of `rows` [T, width] (float32, rows
        contiguous inside); cos/sin [T, rot] contiguous, sin signed as `RotaryEmbedding` keeps it."""
        assert rows.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
        self._rotary_f32(
            rows.data_ptr(),
            rows.shape[0],
            rows.stride(0),
            heads,
            dim,
            cos.data_ptr(),
            sin.data_ptr(),
            cos.shape[-1],
            torch.get_num_threads(),
        )

    def supports_decode(self, cache_dtype: torch.dtype) -> bool:
        return cache_dtype in self._decode

    def paged_decode(
        self,
        q: torch.Tensor,  # [B, H, D] float32, last dim contiguous
        k: torch.Tensor,  # [slots, KVH, D] contiguous
        v: torch.Tensor,
        tables: torch.Tensor,  # [B, W] int64
        lens: torch.Tensor,  # [B] int64
        block_size: int,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        batch, heads, dim = q.shape
        kv_heads = k.shape[1]
        if q.stride(2) != 1 or q.stride(1) != dim:
            q = q.contiguous()
        tables = tables.contiguous()
        lens = lens.contiguous()
        out = torch.empty(batch, heads, dim, dtype=torch.float32)
        status = self._decode[k.dtype](
            q.data_ptr(),
            q.stride(0),
            k.data_ptr(),
            v.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            lens.data_ptr(),
            batch,
            heads,
            kv_heads,
            dim,
            block_size,
            window or 0,
            scale,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise self.error(
                "paged_decode_bf16" if k.dtype == torch.bfloat16 else "paged_decode_f32",
                status,
                f"batch {batch}, longest context {int(lens.max())}",
            )
        return out

    def prefill_fits(self, cache_dtype: torch.dtype, head_dim: int) -> bool:
        """`paged_prefill` runs here: AMX bf16 tiles or AVX2 / AVX-512 FMAs, a bf16 cache, heads of a multiple
        of 32 up to 128."""
        return self.prefill_chunks and cache_dtype == torch.bfloat16 and head_dim % 32 == 0 and head_dim <= 128

    def paged_prefill(
        self,
        q: torch.Tensor,  # [rows, H, D] float32, each row's heads contiguous
        k: torch.Tensor,  # [slots, KVH, D] bf16, contiguous
        v: torch.Tensor,
        table: torch.Tensor,  # [blocks] int64: the sequence's block table
        cached: int,
        block_size: int,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        """[rows, H * D] float32: one sequence's prompt chunk (positions cached .. cached + rows - 1, its K/V
        already in the cache) attending causally over the cache: on AMX bf16 tiles (prefill_amx.c; bf16 queries
        and probabilities, as SDPA in bf16), else on float32 FMAs (prefill_fma.c; float32 throughout)."""
        rows, heads, dim = q.shape
        if q.stride(2) != 1 or q.stride(1) != dim:
            q = q.contiguous()
        table = table.contiguous()
        out = torch.empty(rows, heads * dim, dtype=torch.float32)
        status = self._paged_prefill_bf16(
            q.data_ptr(),
            q.stride(0),
            k.data_ptr(),
            v.data_ptr(),
            table.data_ptr(),
            cached,
            rows,
            heads,
            k.shape[1],
            dim,
            block_size,
            window or 0,
            scale,
            out.data_ptr(),
            heads * dim,
            torch.get_num_threads(),
        )
        if status != 0:
            raise self.error("paged_prefill_bf16", status, f"{rows} rows over {cached} cached, head_dim {dim}")
        return out


Q4_GROUP = 32


def symmetric_lows(d: torch.Tensor, bits: int) -> torch.Tensor:
    """The minimums of a symmetric type (Q4_0, Q5_0, Q8_0): -2^(bits-1)·d, exact in d's float16 (a power of
    two times a value in its range), which the kernel computes where `Q4Weight.m` is None."""
    return d * -(2 ** (bits - 1))


Q4_ISAS = {1: "AVX-512 VNNI", 2: "AVX2"}
"""What `q4_supported` returns for each instruction set the int8 kernels (matmul_q4.c) were built for."""

AMX_MIN_ROWS = 12
"""From this many rows a w4a8 matmul runs on AMX int8 tiles where the CPU has them (matmul_q4.c): 1.1-1.6x
the VNNI path's speed from 12 rows on SmolLM2's shapes (a 2-core Sapphire Rapids), slower below 8."""


@dataclass
class Q4Weight:
    """A [n, k] weight as Q4_1 blocks (w = d·q + m per 32 inputs), laid out for `q4_linear`; with `bits` 5
    or 8 the same with 5- or 8-bit codes (a GGUF's 5-bit types; its 6- and 8-bit ones, and Ember's int8 LM
    head under w4a8). `m` is None where every minimum is -2^(bits-1)·d (the symmetric types Q4_0, Q5_0,
    Q8_0): the kernel computes it, and memory holds what the file holds."""

    packed: torch.Tensor  # uint8: matmul_q4.c's layout, [n / 16, k / 32, ...] (see `pack`)
    d: torch.Tensor  # float16 [n / 16, k / 32, 16]: GGUF's own precision for d and m
    m: torch.Tensor | None  # float16 [n / 16, k / 32, 16], or None: -2^(bits-1)·d
    shape: tuple[int, int]
    bits: int = 4

    @classmethod
    def pack(cls, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int = 4) -> Q4Weight:
        """codes [n, k] in 0..2^bits - 1, scale and low [n, k / 32] (stored as float16, as GGUF stores them)."""
        n, k = codes.shape
        tiles, groups = n // 16, k // Q4_GROUP
        q = codes.to(torch.uint8)
        if bits == 8:  # input 32g + 4c + b of output 16t + j -> [tile, group, chunk, lane, byte]
            packed = q.view(tiles, 16, groups, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
        else:  # input 32g + 8c + 4·nibble + b of output 16t + j -> [tile, group, chunk, lane, byte] bytes
            low4 = (q & 15).view(tiles, 16, groups, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
            packed = (low4[..., 0] | (low4[..., 1] << 4)).contiguous()
            if bits == 5:  # then the fifth bits: mask c, bit 4j + b for input 32g + 4c + b of output 16t + j
                high = (q >> 4).view(tiles, 16, groups, 8, 4).permute(0, 2, 3, 1, 4).reshape(tiles, groups, 8, 8, 8)
                weights = (1 << torch.arange(8, dtype=torch.int32)).view(1, 1, 1, 1, 8)
                masks = (high.int() * weights).sum(-1).to(torch.uint8)  # little-endian bytes of each mask
                packed = torch.cat([packed.view(tiles, groups, 256), masks.view(tiles, groups, 64)], dim=-1)
        per_tile = lambda t: t.half().reshape(tiles, 16, groups).permute(0, 2, 1).contiguous()  # noqa: E731
        d, m = per_tile(scale), per_tile(low)
        if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
            raise ValueError("scales or minimums beyond float16's range")
        if torch.equal(m, symmetric_lows(d, bits)):
            m = None
        return cls(packed, d, m, (n, k), bits)

    @classmethod
    def quantize8(cls, weight: torch.Tensor) -> Q4Weight:
        """8-bit codes of `weight` [n, k] (n % 16 == 0, k % 32 == 0): per 32 inputs, d = range / 255."""
        n, k = weight.shape
        groups = weight.detach().float().view(n, k // Q4_GROUP, Q4_GROUP)
        # d and m as the packing keeps them (float16), so the codes are chosen against what is multiplied.
        low = groups.amin(dim=-1).half().float()
        scale = ((groups.amax(dim=-1) - low) / 255.0).clamp(min=1e-7).half().float()
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 255).view(n, k)
        return cls.pack(codes, scale, low, bits=8)

    @property
    def lows(self) -> torch.Tensor:
        """m, float16 [n / 16, k / 32, 16], computed where it is not stored."""
        return self.m if self.m is not None else symmetric_lows(self.d, self.bits)

    def codes(self) -> torch.Tensor:
        """The [n, k] codes back out of the packing (its exact inverse)."""
        n, k = self.shape
        tiles, groups = n // 16, k // Q4_GROUP
        if self.bits == 8:
            return self.packed.permute(0, 3, 1, 2, 4).reshape(n, k)
        nibbles = self.packed.reshape(tiles, groups, -1)[..., :256].reshape(tiles, groups, 4, 16, 4)
        nibbles = torch.stack([nibbles & 15, nibbles >> 4], dim=-1)  # [tile, group, chunk, lane, byte, 2]
        codes = nibbles.permute(0, 3, 1, 2, 5, 4).reshape(n, k)
        if self.bits == 5:
            codes = codes | (self._fifth_bits().permute(0, 3, 1, 2, 4).reshape(n, k) << 4)
        return codes

    def _fifth_bits(self) -> torch.Tensor:
        """uint8 [tile, group, chunk (8), lane (16), byte (4)]: the codes' fifth bits (5-bit codes)."""
        tiles, groups = self.packed.shape[:2]
        masks = self.packed.reshape(tiles, groups, 320)[..., 256:].reshape(tiles, groups, 8, 8, 1)
        bits = (masks >> torch.arange(8, dtype=torch.uint8)) & 1  # [tile, group, chunk, byte of mask, bit]
        return bits.reshape(tiles, groups, 8, 16, 4)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), k]: the rows `ids` (output features) dequantized, the rest left packed. An
        embedding looks tokens up this way, and the head rescores its candidates."""
        n, k = self.shape
        ids = ids.reshape(-1).long()
        tile, lane = ids // 16, ids % 16
        if self.bits == 8:
            picked = self.packed[tile, :, :, lane, :]  # [rows, groups, chunks, bytes]
        else:  # input 8c + 4·nibble + b of each group
            tiles, groups = self.packed.shape[:2]
            nibbles = self.packed.reshape(tiles, groups, -1)[..., :256].reshape(tiles, groups, 4, 16, 4)
            picked = nibbles[tile, :, :, lane, :]
            picked = torch.stack([picked & 15, picked >> 4], dim=-2)  # [rows, groups, chunks, nibble, bytes]
            if self.bits == 5:
                picked = picked.reshape(len(ids), groups, 8, 4) | (self._fifth_bits()[tile, :, :, lane, :] << 4)
        codes = picked.reshape(len(ids), k // Q4_GROUP, Q4_GROUP).float()
        d, m = self.d[tile, :, lane].float(), self.lows[tile, :, lane].float()  # [rows, groups]
        return (codes * d[..., None] + m[..., None]).reshape(len(ids), k)

    def dequantize(self) -> torch.Tensor:
        """[n, k] float32: d·q + m."""
        n, k = self.shape
        per_row = lambda t: t.float().permute(0, 2, 1).reshape(n, k // Q4_GROUP, 1)  # noqa: E731
        codes = self.codes().float().view(n, k // Q4_GROUP, Q4_GROUP)
        return (codes * per_row(self.d) + per_row(self.lows)).view(n, k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.d, self.m) if t is not None)


@dataclass
class BF16Weight:
    """A [n, k] linear weight in bfloat16, packed for `bf16_linear` / `decode_layers` (matmul_bf16.c): tiles of
    16 output features by pairs of inputs, [n / 16, k / 2, 16, 2]. Multiplies float32 activations
    rounded to bf16, as oneDNN's bf16 linear does, into float32 outputs."""

    packed: torch.Tensor  # bfloat16 [n / 16, k / 2, 16, 2]
    shape: tuple[int, int]
    dtype = torch.bfloat16

    @staticmethod
    def fits(shape: tuple[int, int]) -> bool:
        return len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 32 == 0

    @classmethod
    def runs(cls, device: torch.device, shape: tuple[int, ...]) -> bool:
        """The kernel takes this shape and is the bf16 path here (`bf16_kernel_problem`: AVX-512 BF16, no AMX)."""
        if device.type != "cpu" or not cls.fits(tuple(shape)):
            return False
        return bf16_kernel_problem() is None

    @classmethod
    def pack(cls, weight: torch.Tensor) -> BF16Weight:
        n, k = weight.shape
        packed = weight.detach().to(torch.bfloat16).view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
        return cls(packed, (n, k))

    def dense(self) -> torch.Tensor:
        """[n, k] bfloat16, the packing undone."""
        return self.packed.permute(0, 2, 1, 3).reshape(self.shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., k] → [..., n] float32."""
        flat = x.reshape(-1, self.shape[1])
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.float().contiguous()
        return kernels().bf16_linear(flat, self).view(*x.shape[:-1], self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * 2


def _cpu_tag() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def sources() -> list[Path]:
    """The library's C files (compiled together into one shared object)."""
    return sorted(KERNELS_DIR.glob("*.c"))


def library_path(cache_dir: Path | None = None) -> Path:
    """Where the build for these sources (and headers), these flags and this CPU lives."""
    if cache_dir is None:
        from ember.store import cache_root

        cache_dir = cache_root(_settings["cache_dir"])
    key = hashlib.sha256()
    for source in sorted(KERNELS_DIR.glob("*.[ch]")):
        key.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    for part in (" ".join(FLAGS).encode(), _cpu_tag().encode(), platform.machine().encode()):
        key.update(part)
    return Path(cache_dir) / "kernels" / f"ember_native-{key.hexdigest()[:16]}.so"


def build(target: Path, flags: list[str] | None = None) -> Path:
    """Compile `kernels/*.c` into `target` (atomically: concurrent shards never load a half-written file).
    `flags` replaces FLAGS (tests build the portable, non-AVX-512 variant with it)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        log.info("building Ember's CPU kernels with %s (once per machine)", cc)
        command = [cc, *(flags or FLAGS), *map(str, sources()), "-o", tmp, "-lm"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> Kernels:
    """A built library, typed; NativeError where it does not match this module's declarations."""
    return Kernels(ctypes.CDLL(str(path)), path)


# The shard's --native-kernels and --cache-dir (None: the registry's env var or default, for library callers);
# bf16_kernel: use Ember's bf16 kernel (True), never (False), or where it is the fastest bf16 path (None).
_settings: dict = {"enabled": None, "cache_dir": None, "bf16_kernel": None}


def configure(enabled: bool | None = None, cache_dir: str | None = None) -> None:
    """Apply the shard's settings before the first `kernels()` call."""
    _settings.update(enabled=enabled, cache_dir=cache_dir)


def prefer_bf16_kernel(value: bool | None) -> None:
    """Force Ember's bf16 kernel on or off (tests exercise it on every CPU that can run it); None: automatic."""
    _settings["bf16_kernel"] = value


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )


def cpu_has_amx() -> bool:
    """The CPU multiplies bf16 tiles in AMX units (Sapphire Rapids and later), which oneDNN uses."""
    return "amx_bf16" in cpu_flags()


def bf16_kernel_problem() -> str | None:
    """Why bf16 weights do not go on Ember's bf16 kernel here (None: they do).

    The kernel (vdpbf16ps tiles) beats oneDNN on AVX-512 BF16 CPUs (20-25 % at 32 rows on Zen 4), but where
    the CPU has AMX, oneDNN's AMX tiles are 3.5x faster at 32 rows and 6x at 256 (SmolLM2's shapes on a
    2-core Xeon), so bf16 weights keep oneDNN's layout there and decode steps run op by op.
    """
    k = kernels()
    if k is None:
        return f"Ember's C kernels are off ({unavailable_reason()})"
    if not k.bf16:
        return "the CPU has no AVX-512 BF16 (Ember's bf16 kernel needs it)"
    forced = _settings["bf16_kernel"]
    if forced is False:
        return "Ember's bf16 kernel is switched off"
    if forced is None and cpu_has_amx():
        return "the CPU has AMX: oneDNN's AMX tiles beat Ember's AVX-512 BF16 kernel 3-6x from 32 rows"
    return None


def kernels() -> Kernels | None:
    """The CPU kernels, built on first call; None where they are off or cannot be built (see
    `unavailable_reason`)."""
    global _loaded, _why_unavailable
    if _loaded is not False:
        return _loaded or None
    with _lock:
        if _loaded is not False:
            return _loaded or None
        _loaded = None
        enabled = _settings["enabled"]
        if enabled is None:
            enabled = settings.value("native-kernels")
        if not enabled:
            log.info("--native-kernels false (EMBER_NATIVE=0): CPU kernels off, torch paths only")
            _why_unavailable = "switched off by --native-kernels false (EMBER_NATIVE=0)"
            return None
        try:
            path = library_path()
            if not path.is_file():
                build(path)
            _loaded = load(path)
        except Exception as err:  # a speed-up, never a requirement
            log.warning("CPU kernels unavailable, using torch paths: %s", err)
            _why_unavailable = str(err)
            _loaded = None
        return _loaded


def unavailable_reason() -> str | None:
    """Why `kernels()` is None (None: they are loaded)."""
    if kernels() is not None:
        return None
    return _why_unavailable or "switched off in this process"


def reset_for_tests(value: Kernels | None | bool = False) -> None:
    """Forget (or force) the loaded kernels; tests compare both paths in one process."""
    global _loaded, _why_unavailable
    _loaded = value
    _why_unavailable = None
