"""A GGUF served from its own quantized tensors (`shard/gguf_blocks.py`, `shard/weights.py`).

Each block type the `gguf` package writes is checked on a tiny llama GGUF: under w4a8 every decoder
projection, the embedding and the tied head hold the file's own codes (their values equal what
transformers dequantizes from the file, exactly), and the logits stay within a stated bound of the
float32 model of the same file (transformers' reading of it); under float32 Ember gives transformers'
logits. The K types (written by benchmarks/tiny_gguf.py's own encoder, on a model 256 wide: their
blocks span 256 inputs) hold the file's values but for their scales rounded to float16 and, for Q6_K,
groups requantized where their halves' scales differ.
"""

from __future__ import annotations

import pytest
import torch
from test_model_parity import check_parity, load_reference, reference_logits
from tiny_gguf import K_QUANTS, QUANTIZABLE, write_tiny_gguf

from ember.shard import gguf_blocks, native
from ember.shard.layers import PackedWeight
from ember.shard.runner import Sequence, load_runner
from ember.store import resolve_model

W4A8_BOUND = 0.2
"""Largest |logit difference| under w4a8, as a share of the logits' standard deviation: what quantizing
the activations to int8 per 32 costs on the tiny model (0.07-0.10 measured)."""

TOKENS = [5, 17, 40, 99, 120, 33, 7, 250, 64, 12, 8, 77, 140, 201, 3, 19]

PROJECTIONS = {
    "attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.o_proj": ["self_attn.o_proj"],
    "mlp.gate_up": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.down": ["mlp.down_proj"],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-cache")


K_BOUND = 0.01
"""Largest change of a K-type weight over the largest weight (3.6e-4 for Q4_K and Q5_K, 4e-3 for Q6_K with
every group requantized, benchmarks/results/quality.md)."""


def _resolved(type_name: str, cache):
    path = cache.parent / f"tiny-{type_name}.gguf"
    if not path.exists():
        write_tiny_gguf(path, type_name, vocab_multiple=16, hidden=256 if type_name in K_QUANTS else 32)
    return resolve_model(str(path), cache_dir=cache)


def _holds(weight: torch.Tensor, want: torch.Tensor, type_name: str) -> bool:
    if type_name in K_QUANTS:
        return bool((weight - want).abs().max() <= K_BOUND * want.abs().max())
    return torch.equal(weight, want)


@pytest.mark.parametrize("type_name", [*QUANTIZABLE, *K_QUANTS])
def test_w4a8_runs_the_files_own_codes(type_name, cache):
    resolved = _resolved(type_name, cache)
    reference = load_reference(resolved.path)
    state = reference.state_dict()
    runner = load_runner(resolved.path, dtype="float32", quantize="w4a8")
    model = runner.model
    bits = gguf_blocks.LAYOUTS[type_name][2]
    for i, layer in enumerate(model.layers):
        for where, names in PROJECTIONS.items():
            weight = layer.get_submodule(where).weight
            assert isinstance(weight, PackedWeight) and weight.q4.bits == bits, (i, where)
            want = torch.cat([state[f"model.layers.{i}.{name}.weight"] for name in names])
            assert _holds(weight.dequantize(), want, type_name), (i, where)
    # The tied embedding is looked up from its codes and is the head: one copy, no float table.
    assert isinstance(model.embed.weight, native.Q4Weight) and model.q8_head is model.embed.weight
    ids = torch.tensor([0, 7, 250, 271])
    assert _holds(model.embed(ids), state["model.embed_tokens.weight"][ids], type_name)

    want = reference_logits(reference, TOKENS)
    got = runner.step([Sequence(seq_id=1, token_ids=list(TOKENS))], want_prompt_logits=True).prompt_logits[0]
    assert (got - want).abs().max() <= W4A8_BOUND * want.std()


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_float32_gives_transformers_logits_on_the_same_file(type_name, cache):
    check_parity(_resolved(type_name, cache).path)
