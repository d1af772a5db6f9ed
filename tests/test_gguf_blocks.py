"""GGUF's block types decoded into Ember's packed codes equal the `gguf` package's own dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from tiny_gguf import random_blocks

from ember.shard import gguf_blocks, native

ROWS, COLS = 32, 512


def _blocks(type_name: str, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks of `type_name` for a ROWS x COLS tensor; Q6_K with some groups whose halves share
    their scale (the exact path) and others not (requantized)."""
    raw = random_blocks(type_name, ROWS, COLS, rng, weight_std=0.05, scale_range=(1e-4, 2e-2))
    if type_name == "Q6_K":
        raw[::3, 193:208:2] = raw[::3, 192:208:2]
    return raw


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"])
def test_exact_types_decode_to_the_reference_values(type_name):
    raw = _blocks(type_name, np.random.default_rng(len(type_name) + ord(type_name[1])))
    reference = quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(ROWS, COLS)
    codes = gguf_blocks.decode(type_name, torch.from_numpy(raw), (ROWS, COLS))
    assert codes.bits == gguf_blocks.LAYOUTS[type_name][2]
    assert int(codes.codes.max()) < 2**codes.bits
    mine = codes.dequantize().numpy()
    assert np.allclose(mine, reference, rtol=1e-6, atol=1e-7), np.abs(mine - reference).max()


def test_q6_k_is_exact_where_a_group_shares_its_scale_and_within_a_fraction_of_its_step_elsewhere():
    raw = _blocks("Q6_K", np.random.default_rng(6))
    reference = quants.dequantize(raw, GGMLQuantizationType.Q6_K).reshape(ROWS, COLS)
    mine = gguf_blocks.dequantize("Q6_K", torch.from_numpy(raw), (ROWS, COLS)).numpy()
    blocks = raw.reshape(-1, 210)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)[:, 0]
    signed = d[:, None] * blocks[:, 192:208].view(np.int8).astype(np.float32)  # [block, 16 halves]
    steps = np.abs(signed)
    per_input = np.repeat(steps, 16, axis=1).reshape(ROWS, COLS)
    shared = np.repeat(signed[:, 0::2] == signed[:, 1::2], 32, axis=1).reshape(ROWS, COLS)
    assert shared.any() and (~shared).any()
    assert np.allclose(mine[shared], reference[shared], rtol=1e-6, atol=1e-7)
    # Requantized over the group's range in 255 steps: within half a new step, at most ~1/8 of the old one.
    group_step = np.repeat(steps.reshape(-1, 8, 2).max(axis=-1), 32, axis=1).reshape(ROWS, COLS)
    assert np.all(np.abs(mine - reference) <= group_step * 63 / 255 / 2 * 1.0001 + 1e-9)
    assert np.abs(mine - reference).max() < per_input.max() / 8


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0", "Q6_K"])
def test_codes_pack_into_embers_kernel_weight_without_loss(type_name):
    raw = _blocks(type_name, np.random.default_rng(7))
    codes = gguf_blocks.decode(type_name, torch.from_numpy(raw), (ROWS, COLS))
    packed = native.Q4Weight.pack(codes.codes, codes.scale, codes.low, bits=codes.bits)
    # The packing keeps d and m in float16, as GGUF stores them: exact for the 32-input types, the
    # K types' products d·scale rounded to it (2^-11 of each scale at most).
    halves = gguf_blocks.Codes(codes.codes, codes.scale.half().float(), codes.low.half().float(), codes.bits)
    assert torch.equal(packed.dequantize(), halves.dequantize())
    if type_name in ("Q4_0", "Q5_0", "Q5_1", "Q8_0"):
        assert torch.equal(packed.dequantize(), codes.dequantize())
    assert packed.nbytes == codes.nbytes_packed
    # In memory as in the file: the symmetric types store no minimum, 5-bit codes take 5 bits.
    assert (packed.m is None) == (type_name in ("Q4_0", "Q5_0", "Q8_0"))
    # (The K types' 6-bit sub-scales become float16 per 32: Q4_K takes 5 bits a weight for the file's 4.5.)
    if type_name in ("Q4_0", "Q5_0", "Q5_K", "Q8_0"):
        assert packed.nbytes <= raw.nbytes * 1.1, (packed.nbytes, raw.nbytes)


def test_types_ember_cannot_run_are_refused_by_name():
    assert gguf_blocks.unsupported("Q4_K") is None and gguf_blocks.unsupported("BF16") is None
    reason = gguf_blocks.unsupported("IQ2_XXS")
    assert reason and "IQ2_XXS" in reason and "Q4_K" in reason
    with pytest.raises(gguf_blocks.UnsupportedQuant, match="Q3_K"):
        gguf_blocks.decode("Q3_K", torch.zeros(110, dtype=torch.uint8), (1, 256))
    with pytest.raises(ValueError, match="whole number"):
        gguf_blocks.decode("Q4_K", torch.zeros(144, dtype=torch.uint8), (2, 128))


def test_the_store_refuses_exactly_the_types_the_shard_cannot_run():
    from ember import store

    assert set(store.RUNNABLE_TENSOR_TYPES) == {*gguf_blocks.LAYOUTS, *gguf_blocks.FLOAT_TYPES}
