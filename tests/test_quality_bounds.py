"""Each CPU precision the shard may pick by itself holds the bound benchmarks/results/quality.md states for it.

The tiny model's decoder weights are first snapped to a 4-bit grid per 32 inputs (Q4_1's layout), as a
4-bit GGUF's are: that is the source the automatic choice runs at int4 / w4a8 (`ember.shard.precision`).
A setting whose numbers break (a kernel's rounding gone wrong, a scale off by a step) fails here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import quality  # noqa: E402


def _snap_to_q4_1(model_dir: Path, out: Path) -> Path:
    shutil.copytree(model_dir, out)
    tensors = load_file(out / "model.safetensors")
    for name, w in tensors.items():
        if name.endswith("proj.weight") and w.dim() == 2 and w.shape[1] % 32 == 0:
            groups = w.view(w.shape[0], -1, 32)
            low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
            scale = ((high - low) / 15).clamp(min=1e-8)
            codes = ((groups - low) / scale).round().clamp(0, 15)
            tensors[name] = (codes * scale + low).view_as(w).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def four_bit_model(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from ember.shard.runner import load_runner

    model = _snap_to_q4_1(tiny_llama_dir, tmp_path_factory.mktemp("q4") / "model")
    tok = AutoTokenizer.from_pretrained(model)
    from tiny import _CORPUS

    token_lists = [tok(" ".join(_CORPUS * 3))["input_ids"][:200]]
    return model, token_lists, quality.distributions(load_runner(model, dtype="float32"), token_lists)


@pytest.mark.parametrize("name", list(quality.SETTINGS))
def test_each_setting_holds_its_stated_bound(four_bit_model, name):
    from ember.shard.runner import load_runner

    model, token_lists, reference = four_bit_model
    try:
        runner = load_runner(model, dtype="float32", **quality.SETTINGS[name])
    except ValueError as err:  # w4a8 without the VNNI kernel: the automatic choice never picks it here
        pytest.skip(str(err))
    kl, top1 = quality.compare(reference, quality.distributions(runner, token_lists))
    max_kl, min_top1 = quality.BOUNDS[name]
    assert kl <= max_kl and top1 >= min_top1, f"{name}: KL {kl:.5f} (bound {max_kl}), top-1 {top1:.3f}"
    assert kl > 0 or name == "bf16 matmuls" and not torch.backends.mkldnn.is_available()  # it did run quantized


def test_the_bounds_tell_a_broken_setting():
    """The comparison is not blind: a distribution shifted by noise fails the tightest bound."""
    torch.manual_seed(0)
    reference = [torch.randn(50, 64)]
    noisy = [reference[0] + 0.5 * torch.randn(50, 64)]
    assert not quality.within("int4", *quality.compare(reference, noisy))
    assert quality.within("int4", *quality.compare(reference, [reference[0].clone()]))
