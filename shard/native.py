"""Ember's C kernels for the CPU (`native.c`): built once per machine, loaded through ctypes.

The source is compiled with the machine's C compiler (`$CC`, else `cc`) at
first use, for the CPU it runs on (`-march=native`) and with OpenMP, into the
cache (`$EMBER_CACHE/kernels`, keyed by source, flags and CPU). The OpenMP
runtime is torch's own (`libgomp.so.1` is already loaded when torch is), so
the kernels share torch's threads rather than adding a second pool.

Without a compiler, or with `EMBER_NATIVE=0`, `kernels()` returns None and
the callers keep their torch paths: the kernels are a speed-up, never a
requirement.
"""

from __future__ import annotations

import ctypes
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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p

_lock = threading.Lock()
_loaded: "Kernels | None | bool" = False  # False: not tried yet


class Kernels:
    """The loaded library with typed entry points."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._decode = {}
        for dtype, name in ((torch.float32, "paged_decode_f32"), (torch.bfloat16, "paged_decode_bf16")):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _I64,
                           ctypes.c_float, _PTR, ctypes.c_int]
            self._decode[dtype] = fn
        self._rms_norm = _typed(lib.rms_norm_f32, [_PTR, _PTR, _PTR, _PTR, ctypes.c_float, _PTR, _I64, _I64,
                                                   ctypes.c_int])
        self._silu_mul = _typed(lib.silu_mul_f32, [_PTR, _PTR, _I64, _I64, ctypes.c_int])
        self._rotary = _typed(lib.rotary_f32, [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, ctypes.c_int])
        self._q4_linear = _typed(lib.q4_linear, [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, ctypes.c_int,
                                                 ctypes.c_int])
        self.q4 = bool(lib.q4_supported())  # built with AVX-512 VNNI
        self._bf16_linear = _typed(lib.bf16_linear, [_PTR, _I64, _I64, _PTR, _I64, _PTR, ctypes.c_int])
        self.bf16 = bool(lib.bf16_supported())  # built with AVX-512 BF16
        self._kv_store = _typed(lib.kv_store, [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR, ctypes.c_int])
        self._argmax_lse = _typed(lib.argmax_lse, [_PTR, _I64, _I64, _PTR, _PTR, ctypes.c_int])
        self._topk_rows = _typed(lib.topk_rows, [_PTR, _I64, _I64, _I64, _PTR, ctypes.c_int])
        self._decode_layers = _typed(lib.decode_layers, [
            _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _PTR, _PTR, _I64, _PTR, _PTR,
            _PTR, _I64, _PTR, _I64, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int])

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
        if self._topk_rows(x.data_ptr(), rows, vocab, k, idx.data_ptr(), torch.get_num_threads()) != 0:
            raise ValueError(f"topk_indices: k={k} must be in 1..min(256, {vocab})")
        return idx

    def decode_layers(self, table: torch.Tensor, delta: torch.Tensor, residual: torch.Tensor, heads: int,
                      kv_heads: int, head_dim: int, inter: int, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                      slots: torch.Tensor, tables: torch.Tensor, row_seq: torch.Tensor | None, lens: torch.Tensor,
                      block_size: int, bf16_cache: bool, bf16_weights: bool = False) -> None:
        """Every decoder layer of a w4a8 step (or of bf16 weights, `bf16_weights`) in one call
        (`decode_layers` in native.c).

        `table` [layers, DECODE_LAYER_FIELDS] int64 holds each layer's weight and cache addresses;
        `delta` [rows, hidden] float32 enters with the embeddings and leaves with the last layer's
        output, `residual` leaves with the residual stream before it. Row r is a token of sequence
        `row_seq[r]` (None: of sequence r, one token each), whose block table is `tables[row_seq[r]]`,
        and attends over `lens[r]` keys of it (int64 tensors, contiguous)."""
        rows, hidden = delta.shape
        rc = self._decode_layers(
            table.data_ptr(), table.shape[0], delta.data_ptr(), residual.data_ptr(), rows, hidden, heads, kv_heads,
            head_dim, inter, eps, cos.data_ptr(), sin.data_ptr(), cos.shape[-1], slots.data_ptr(),
            tables.data_ptr(), row_seq.data_ptr() if row_seq is not None else None, tables.shape[1], lens.data_ptr(), block_size, head_dim ** -0.5, int(bf16_cache),
            int(bf16_weights), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"decode_layers failed ({rc})")

    def bf16_linear(self, x: torch.Tensor, weight: "BF16Weight") -> torch.Tensor:
        """[rows, n] float32: x [rows, k] (float32, contiguous) rounded to bf16, times the packed weight."""
        rows, k = x.shape
        n = weight.shape[0]
        out = torch.empty(rows, n, dtype=torch.float32)
        if self._bf16_linear(x.data_ptr(), rows, k, weight.packed.data_ptr(), n, out.data_ptr(),
                             torch.get_num_threads()) != 0:
            raise RuntimeError(f"bf16_linear failed for x {tuple(x.shape)} and weight {weight.shape}")
        return out

    def kv_store(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> bool:
        """Write k, v [T, KVH, D] (float32, heads contiguous in each row) into slots of the flat caches
        (float32 or bf16, contiguous); False (nothing written) when the layouts do not fit."""
        width = k.shape[1] * k.shape[2]
        if (k.dtype != torch.float32 or v.dtype != torch.float32 or k_cache.dtype not in self._decode
                or k.stride(2) != 1 or k.stride(1) != k.shape[2] or v.stride(2) != 1 or v.stride(1) != v.shape[2]
                or not k_cache.is_contiguous() or not v_cache.is_contiguous() or slots.dtype != torch.long):
            return False
        self._kv_store(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr(), k.shape[0], width,
                       k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16))
        return True

    @staticmethod
    def fits(*tensors: torch.Tensor) -> bool:
        """The elementwise kernels take contiguous float32 CPU tensors."""
        for t in tensors:
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                return False
        return True

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(r) * weight, r) with r = x + residual (or x): rows of the last dimension."""
        dim = x.shape[-1]
        out = torch.empty_like(x)
        summed = torch.empty_like(x) if residual is not None else x
        self._rms_norm(x.data_ptr(), residual.data_ptr() if residual is not None else None,
                       summed.data_ptr() if residual is not None else None, weight.data_ptr(), eps,
                       out.data_ptr(), x.numel() // dim, dim, torch.get_num_threads())
        return out, summed

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for `gate_up` = [gate | up] along the last dimension."""
        inter = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], inter)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter), inter,
                       torch.get_num_threads())
        return out

    def q4_linear(self, x: torch.Tensor, weight: Q4Weight) -> torch.Tensor:
        """x [rows, k] float32 contiguous -> [rows, n] float32 (activations quantized per 32 to int8)."""
        n, k = weight.shape
        rows = x.shape[0]
        out = torch.empty(rows, n, dtype=torch.float32)
        rc = self._q4_linear(x.data_ptr(), rows, k, weight.packed.data_ptr(), weight.d.data_ptr(),
                             weight.m.data_ptr(), n, out.data_ptr(), weight.bits, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"q4_linear failed ({rc})")
        return out

    def rotary_(self, rows: torch.Tensor, heads: int, dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate, in place, the first `heads` heads of each row of `rows` [T, width] (float32, rows
        contiguous inside); cos/sin [T, rot] contiguous, sin signed as `RotaryEmbedding` keeps it."""
        assert rows.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
        self._rotary(rows.data_ptr(), rows.shape[0], rows.stride(0), heads, dim, cos.data_ptr(), sin.data_ptr(),
                     cos.shape[-1], torch.get_num_threads())

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
        rc = self._decode[k.dtype](
            q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), tables.data_ptr(), tables.shape[1],
            lens.data_ptr(), batch, heads, kv_heads, dim, block_size, window or 0, scale, out.data_ptr(),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("paged decode attention could not allocate its scratch buffers")
        return out


Q4_GROUP = 32
DECODE_LAYER_FIELDS = 17  # addresses per layer in decode_layers' table (native.c)


@dataclass
class Q4Weight:
    """A [n, k] weight as Q4_1 blocks (w = d·q + m per 32 inputs), laid out for `q4_linear`; with
    `bits` 8 the same with 8-bit codes (Ember's int8 LM head under w4a8)."""

    packed: torch.Tensor  # uint8 [n / 16, k / 32, 4, 16, 4]: two codes per byte (8 bits: [.., 8, 16, 4]), native.c
    d: torch.Tensor  # float32 [n / 16, k / 32, 16]
    m: torch.Tensor  # float32 [n / 16, k / 32, 16]
    shape: tuple[int, int]
    bits: int = 4

    @classmethod
    def pack(cls, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int = 4) -> "Q4Weight":
        """codes [n, k] in 0..2^bits - 1, scale and low [n, k / 32] (float32)."""
        n, k = codes.shape
        tiles, groups = n // 16, k // Q4_GROUP
        if bits == 8:  # input 32g + 4c + b of output 16t + j -> [tile, group, chunk, lane, byte]
            packed = codes.to(torch.uint8).view(tiles, 16, groups, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
        else:  # input 32g + 8c + 4·nibble + b of output 16t + j -> [tile, group, chunk, lane, byte] bytes
            q = codes.to(torch.uint8).view(tiles, 16, groups, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
            packed = (q[..., 0] | (q[..., 1] << 4)).contiguous()
        per_tile = lambda t: t.float().reshape(tiles, 16, groups).permute(0, 2, 1).contiguous()  # noqa: E731
        return cls(packed, per_tile(scale), per_tile(low), (n, k), bits)

    @classmethod
    def quantize8(cls, weight: torch.Tensor) -> "Q4Weight":
        """8-bit codes of `weight` [n, k] (n % 16 == 0, k % 32 == 0): per 32 inputs, d = range / 255."""
        n, k = weight.shape
        groups = weight.detach().float().view(n, k // Q4_GROUP, Q4_GROUP)
        low = groups.amin(dim=-1)
        scale = ((groups.amax(dim=-1) - low) / 255.0).clamp(min=1e-12)
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 255).view(n, k)
        return cls.pack(codes, scale, low, bits=8)

    def codes(self) -> torch.Tensor:
        """The [n, k] codes back out of the packing (its exact inverse)."""
        n, k = self.shape
        if self.bits == 8:
            return self.packed.permute(0, 3, 1, 2, 4).reshape(n, k)
        nibbles = torch.stack([self.packed & 15, self.packed >> 4], dim=-1)  # [tile, group, chunk, lane, byte, 2]
        return nibbles.permute(0, 3, 1, 2, 5, 4).reshape(n, k)

    def dequantize(self) -> torch.Tensor:
        """[n, k] float32: d·q + m."""
        n, k = self.shape
        per_row = lambda t: t.permute(0, 2, 1).reshape(n, k // Q4_GROUP, 1)  # noqa: E731
        codes = self.codes().float().view(n, k // Q4_GROUP, Q4_GROUP)
        return (codes * per_row(self.d) + per_row(self.m)).view(n, k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.d, self.m))


@dataclass
class BF16Weight:
    """A [n, k] linear weight in bfloat16, packed for `bf16_linear` / `decode_layers` (native.c): tiles of
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
        """The kernel takes this shape and this machine's kernels have it (AVX-512 BF16)."""
        if device.type != "cpu" or not cls.fits(tuple(shape)):
            return False
        k = kernels()
        return k is not None and k.bf16

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "BF16Weight":
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


def _typed(fn, argtypes: list) -> "ctypes._CFuncPtr":
    fn.restype = ctypes.c_int
    fn.argtypes = argtypes
    return fn


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


def library_path(cache_dir: Path | None = None) -> Path:
    """Where the build for this source, these flags and this CPU lives."""
    if cache_dir is None:
        from ember.store import cache_root

        cache_dir = cache_root()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), _cpu_tag().encode(), platform.machine().encode()):
        key.update(part)
    return Path(cache_dir) / "kernels" / f"ember_native-{key.hexdigest()[:16]}.so"


def build(target: Path, flags: list[str] | None = None) -> Path:
    """Compile `native.c` into `target` (atomically: concurrent shards never load a half-written file).
    `flags` replaces FLAGS (tests build the portable, non-AVX-512 variant with it)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        log.info("building Ember's CPU kernels with %s (once per machine)", cc)
        done = subprocess.run([cc, *(flags or FLAGS), str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> Kernels:
    """A built library, typed."""
    return Kernels(ctypes.CDLL(str(path)), path)


def kernels() -> Kernels | None:
    """The CPU kernels, built on first call; None where they are off or cannot be built."""
    global _loaded
    if _loaded is not False:
        return _loaded or None
    with _lock:
        if _loaded is not False:
            return _loaded or None
        _loaded = None
        if os.environ.get("EMBER_NATIVE", "1") in ("0", "false", "no", "off"):
            log.info("EMBER_NATIVE=0: CPU kernels off, torch paths only")
            return None
        try:
            path = library_path()
            if not path.is_file():
                build(path)
            _loaded = load(path)
        except Exception as err:  # a speed-up, never a requirement
            log.warning("CPU kernels unavailable, using torch paths: %s", err)
            _loaded = None
        return _loaded


def reset_for_tests(value: "Kernels | None | bool" = False) -> None:
    """Forget (or force) the loaded kernels; tests compare both paths in one process."""
    global _loaded
    _loaded = value
