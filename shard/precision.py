"""The precision a shard serves at when nobody says: the fastest setting whose quality is stated and tested.

With no `--dtype`, `--matmul-dtype` or `--quantize`, the CPU path picks by the
model's source and the CPU, as llama.cpp and Ollama run a GGUF at its own
quantization (the bounds each setting holds against float32 are measured in
`benchmarks/results/quality.md` and kept by `tests/test_quality_bounds.py`):

| source                          | CPU has                          | runs                                |
|---------------------------------|----------------------------------|-------------------------------------|
| GGUF, 4-bit (Q4_0, Q4_1, Q4_K…) | AVX2 or AVX-512 VNNI (+ a C compiler) | `w4a8`                         |
| GGUF, 4-bit                     | otherwise                        | `int4` (bf16 matmuls above 8 rows)  |
| GGUF, Q8_0                      | any                              | `int8`                              |
| bf16 / fp16 weights (any source)| AVX-512 BF16 or AMX              | float32 activations, bf16 matmuls   |
| anything else                   |                                  | float32                             |

Models without Ember's model code (the generic transformers path) and CUDA
devices keep their dtype. Any of the three flags turns the choice off: what
is asked for is served. The choice and its reason are logged at start and
reported by `/info`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("ember.shard")

FOUR_BIT_GGUF = ("Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS")
# Held as 5-bit (Q5_*) or 8-bit (Q6_K) codes on the int8 kernel (w4a8 keeps a GGUF's own codes: `weights.keep_codes`).
FIVE_TO_SIX_BIT_GGUF = ("Q5_0", "Q5_1", "Q5_K", "Q6_K")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    dtype: str | None  # activations (None: the shard's default for the device)
    matmul_dtype: str | None
    quantize: str | None
    reason: str
    automatic: bool

    @property
    def summary(self) -> str:
        """What /info and the start log show, e.g. `w4a8` or `float32 activations, bfloat16 matmuls`."""
        if self.quantize:
            return self.quantize
        if self.matmul_dtype and self.matmul_dtype != (self.dtype or "float32"):
            return f"{self.dtype or 'float32'} activations, {self.matmul_dtype} matmuls"
        return self.dtype or "the model's dtype"


def source_weight_type(model_dir: Path) -> str | None:
    """The GGUF tensor type most of a converted model's weights had (`ember_source.json`), else None."""
    try:
        source = json.loads((Path(model_dir) / "ember_source.json").read_text())
    except (OSError, ValueError):
        return None
    return source.get("weight_type")


def _config(model_dir: Path) -> dict:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _w4a8_problem() -> str | None:
    """Why the w4a8 kernel cannot run here: the same check `load_runner` makes before packing."""
    from ember.shard.layers import PackedWeight

    return PackedWeight.unfit_reason("w4a8", (16, 32), torch.device("cpu"))


def _gguf_codes(weight_type: str, what: str, fallback: str) -> Precision:
    """A quantized GGUF: w4a8 over its own codes where the int8 kernel runs (`what` it then computes), else
    `fallback`."""
    problem = _w4a8_problem()
    if problem is None:
        from ember.shard import native

        reason = f"the GGUF's weights are {weight_type} and the CPU has {native.kernels().q4_isa}: {what}"
        return Precision(None, None, "w4a8", reason, automatic=True)
    reason = f"the GGUF's weights are {weight_type}; not w4a8 because {problem}"
    return Precision(None, None, fallback, reason, automatic=True)


def choose(
    model_dir: Path,
    device: torch.device,
    dtype: str | None = None,
    matmul_dtype: str | None = None,
    quantize: str | None = None,
    flags: set[str] | None = None,
) -> Precision:
    """The precision to load `model_dir` at; explicit flags win (quantize `none`: no quantization)."""
    if dtype or matmul_dtype or quantize:
        return Precision(
            dtype,
            matmul_dtype,
            None if quantize in (None, "none") else quantize,
            "as asked on the command line",
            automatic=False,
        )
    if device.type != "cpu":
        return Precision(None, None, None, f"{device.type}: the model's dtype", automatic=True)
    from ember.shard.runner import SUPPORTED_MODEL_TYPES

    config = _config(model_dir)
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        return Precision(
            "float32", None, None, "float32: the generic transformers path has no faster CPU setting", automatic=True
        )
    weight_type = source_weight_type(model_dir)
    if weight_type in FOUR_BIT_GGUF:
        return _gguf_codes(weight_type, "4-bit weights times int8 activations", "int4")
    if weight_type in FIVE_TO_SIX_BIT_GGUF:
        return _gguf_codes(
            weight_type,
            "its own codes (5-bit as they are, 6-bit as 8-bit) times int8 activations, as llama.cpp multiplies them",
            "int8",
        )
    if weight_type == "Q8_0":
        return Precision(None, None, "int8", "the GGUF's weights are Q8_0: 8-bit weights", automatic=True)
    stored = weight_type or config.get("torch_dtype") or config.get("dtype")
    stored = {"BF16": "bfloat16", "F16": "float16"}.get(str(stored), stored)
    if flags is None:
        from ember.shard import native

        flags = native.cpu_flags()
    if stored in ("bfloat16", "float16"):
        has = [f for f in BF16_CPU_FLAGS if f in flags]
        if has:
            return Precision(
                "float32",
                "bfloat16",
                None,
                f"the weights are {stored} and the CPU has {has[0]}: bf16 matmuls, float32 activations",
                automatic=True,
            )
        return Precision(
            "float32",
            None,
            None,
            f"the weights are {stored} but the CPU has no AVX-512 BF16 or AMX: float32",
            automatic=True,
        )
    return Precision(
        "float32",
        None,
        None,
        f"the weights are {stored or 'float32'}: float32 "
        "(--matmul-dtype bfloat16 or --quantize trade precision for speed)",
        automatic=True,
    )
