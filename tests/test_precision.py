"""The shard's automatic precision (`ember.shard.precision.choose`): a GGUF at its own quantization, bf16/fp16
weights on bf16 matmuls where the CPU has the units, float32 otherwise; any flag wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ember.shard import native
from ember.shard.precision import choose

CPU = torch.device("cpu")
BF16_CPU = {"avx512f", "avx512_bf16"}


def _model(
    tmp_path: Path, model_type: str = "llama", torch_dtype: str = "float32", weight_type: str | None = None
) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "torch_dtype": torch_dtype}))
    if weight_type is not None:
        (tmp_path / "ember_source.json").write_text(json.dumps({"gguf": "m.gguf", "weight_type": weight_type}))
    return tmp_path


def _has_int8_kernel() -> bool:
    kernels = native.kernels()
    return kernels is not None and kernels.q4


def test_a_four_bit_gguf_runs_at_its_own_quantization(tmp_path):
    p = choose(_model(tmp_path, weight_type="Q4_1"), CPU, flags=BF16_CPU)
    assert p.automatic and p.quantize == ("w4a8" if _has_int8_kernel() else "int4")
    assert "Q4_1" in p.reason and p.summary == p.quantize
    if p.quantize == "w4a8":  # the reason names the instruction set the kernel was built for
        assert native.kernels().q4_isa in ("AVX-512 VNNI", "AVX2") and native.kernels().q4_isa in p.reason


def test_without_the_int8_kernel_a_four_bit_gguf_runs_int4(tmp_path, monkeypatch):
    monkeypatch.setattr("ember.shard.precision._w4a8_problem", lambda: "the CPU has no AVX-512 VNNI")
    p = choose(_model(tmp_path, weight_type="Q4_K"), CPU)
    assert p.quantize == "int4" and "VNNI" in p.reason


@pytest.mark.parametrize("weight_type", ["Q5_0", "Q6_K"])
def test_a_five_or_six_bit_gguf_keeps_its_codes_on_the_int8_kernel(tmp_path, monkeypatch, weight_type):
    p = choose(_model(tmp_path, weight_type=weight_type), CPU)
    assert p.automatic and p.quantize == ("w4a8" if _has_int8_kernel() else "int8") and weight_type in p.reason
    monkeypatch.setattr("ember.shard.precision._w4a8_problem", lambda: "the CPU has no AVX-512 VNNI")
    assert choose(_model(tmp_path, weight_type=weight_type), CPU).quantize == "int8"


def test_a_q8_gguf_runs_int8(tmp_path):
    assert choose(_model(tmp_path, weight_type="Q8_0"), CPU).quantize == "int8"


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_weights_run_bf16_matmuls_where_the_cpu_has_them(tmp_path, stored):
    model = _model(tmp_path, torch_dtype=stored)
    fast = choose(model, CPU, flags=BF16_CPU)
    assert (fast.dtype, fast.matmul_dtype, fast.quantize) == ("float32", "bfloat16", None)
    assert "avx512_bf16" in fast.reason and fast.summary == "float32 activations, bfloat16 matmuls"
    assert choose(model, CPU, flags={"amx_bf16"}).matmul_dtype == "bfloat16"
    slow = choose(model, CPU, flags={"avx2"})
    assert (slow.dtype, slow.matmul_dtype) == ("float32", None) and "no AVX-512 BF16" in slow.reason


def test_a_half_precision_gguf_counts_as_half_precision_weights(tmp_path):
    assert choose(_model(tmp_path, weight_type="F16"), CPU, flags=BF16_CPU).matmul_dtype == "bfloat16"


def test_float32_weights_stay_float32(tmp_path):
    p = choose(_model(tmp_path), CPU, flags=BF16_CPU)
    assert (p.dtype, p.matmul_dtype, p.quantize, p.summary) == ("float32", None, None, "float32")


def test_models_without_embers_code_stay_float32(tmp_path):
    p = choose(_model(tmp_path, model_type="gpt2", weight_type="Q4_1"), CPU, flags=BF16_CPU)
    assert (p.quantize, p.matmul_dtype) == (None, None) and "generic" in p.reason


def test_any_flag_turns_the_choice_off(tmp_path):
    model = _model(tmp_path, weight_type="Q4_1")
    assert choose(model, CPU, dtype="float32").quantize is None
    assert choose(model, CPU, matmul_dtype="bfloat16").matmul_dtype == "bfloat16"
    assert choose(model, CPU, quantize="int8").quantize == "int8"
    none = choose(model, CPU, quantize="none")
    assert none.quantize is None and not none.automatic


def test_cuda_keeps_the_models_dtype(tmp_path):
    p = choose(_model(tmp_path, weight_type="Q4_1"), torch.device("cuda"))
    assert (p.dtype, p.matmul_dtype, p.quantize) == (None, None, None)


@pytest.mark.slow
def test_the_default_models_cache_records_its_weight_type(smollm2_dir):
    """The store records the GGUF's weight type, which the choice reads (SmolLM2's decoder is Q4_1)."""
    assert json.loads((smollm2_dir / "ember_source.json").read_text())["weight_type"] == "Q4_1"
