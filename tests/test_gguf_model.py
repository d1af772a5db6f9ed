"""A GGUF served from its own quantized tensors (`shard/gguf_blocks.py`, `shard/weights.py`).

Each block type the `gguf` package writes is checked on a tiny llama GGUF: under w4a8 every decoder
projection, the embedding and the tied head hold the file's own codes (their values equal what
transformers dequantizes from the file, exactly), and the logits stay within a stated bound of the
float32 model of the same file (transformers' reading of it); under float32 Ember gives transformers'
logits. K-quant types are checked block by block against the `gguf` package in test_gguf_blocks.py.
"""

from __future__ import annotations

import pytest
import torch
from test_model_parity import check_parity, load_reference, reference_logits
from tiny_gguf import QUANTIZABLE, write_tiny_gguf

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


def _resolved(type_name: str, cache):
    path = cache.parent / f"tiny-{type_name}.gguf"
    if not path.exists():
        write_tiny_gguf(path, type_name, vocab_multiple=16)
    return resolve_model(str(path), cache_dir=cache)


@pytest.mark.parametrize("type_name", QUANTIZABLE)
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
            assert torch.equal(weight.dequantize(), want), (i, where)
    # The tied embedding is looked up from its codes and is the head: one copy, no float table.
    assert isinstance(model.embed.weight, native.Q4Weight) and model.q8_head is model.embed.weight
    ids = torch.tensor([0, 7, 250, 271])
    assert torch.equal(model.embed(ids), state["model.embed_tokens.weight"][ids])

    want = reference_logits(reference, TOKENS)
    got = runner.step([Sequence(seq_id=1, token_ids=list(TOKENS))], want_prompt_logits=True).prompt_logits[0]
    assert (got - want).abs().max() <= W4A8_BOUND * want.std()


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
def test_float32_gives_transformers_logits_on_the_same_file(type_name, cache):
    check_parity(_resolved(type_name, cache).path)
