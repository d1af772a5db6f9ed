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

from pathlib import Path

import pytest
import torch
from test_model_parity import check_parity, load_reference, reference_logits
from tiny import run_two_ranks
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


# --- tensor parallelism: each rank holds its slice of the file's codes -------------------------------

TP_BOUND = 0.2
"""Largest |logit difference| between two ranks and one under w4a8, as a share of the logits' standard
deviation: the row-parallel sums add in another order, and the int8 rounding of the next layer's
activations amplifies that (measured 0.02-0.09 on Q4_0, Q5_0 and Q8_0 files 256 wide, 0.10 on Q5_K 512
wide); the weights each rank holds are checked exactly."""


def _tp_worker(rank: int, path: str, port: int, out_dir: str) -> None:
    from ember.shard.dist import init_distributed

    torch.set_num_threads(1)
    group = init_distributed(rank, 2, "127.0.0.1", port, "cpu")
    runner = load_runner(path, dtype="float32", quantize="w4a8", rank=rank, world_size=2, group=group)
    held = [layer.get_submodule(where).weight.q4 for layer in runner.model.layers for where in PROJECTIONS]
    out = runner.step([Sequence(seq_id=1, token_ids=list(TOKENS))], want_prompt_logits=True).prompt_logits[0]
    layer = runner.model.layers[0]
    parts = {where: layer.get_submodule(where).weight.q4.dequantize() for where in ("attn.o_proj", "mlp.down")}
    result = {"logits": out, "bits": sorted({q.bits for q in held}), "bytes": sum(q.nbytes for q in held), **parts}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_K"])
def test_two_ranks_each_hold_half_of_the_files_5_bit_codes(type_name, cache, tmp_path):
    """Under w4a8 on two ranks every projection holds its slice of the file's 5-bit codes, half of what one
    rank holds, and the ranks give one rank's logits (the row-parallel sums only add in another order)."""
    path = cache.parent / f"tiny-{type_name}-wide.gguf"
    if not path.exists():  # each rank's half of a row must be whole blocks: 128 inputs of Q5_0's 32, 256 of Q5_K's
        write_tiny_gguf(path, type_name, vocab_multiple=16, hidden=512 if type_name in K_QUANTS else 256)
    model_dir = resolve_model(str(path), cache_dir=cache).path
    ranks = run_two_ranks(_tp_worker, model_dir, tmp_path)
    one = load_runner(model_dir, dtype="float32", quantize="w4a8")
    held = [layer.get_submodule(where).weight.q4 for layer in one.model.layers for where in PROJECTIONS]
    want = one.step([Sequence(seq_id=1, token_ids=list(TOKENS))], want_prompt_logits=True).prompt_logits[0]
    for rank, got in enumerate(ranks):
        assert got["bits"] == [5] and {q.bits for q in held} == {5}
        assert 2 * got["bytes"] == sum(q.nbytes for q in held)
        for where in ("attn.o_proj", "mlp.down"):  # row-parallel: this rank's half of every row, exactly
            full = one.model.layers[0].get_submodule(where).weight.q4.dequantize()
            half = full.shape[1] // 2
            assert torch.equal(got[where], full[:, rank * half : (rank + 1) * half]), where
        assert (got["logits"] - want).abs().max() <= TP_BOUND * want.std()
