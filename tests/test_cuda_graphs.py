"""Decode steps through fixed-shape buckets (CUDA graphs on a GPU, the same buckets eagerly elsewhere).

Off CUDA the buckets run without capture, so the padding rows, the spare block, the
static metadata and the bucket choice are checked here on every machine; the CUDA tests
add the capture and replay.
"""

from __future__ import annotations

import pytest
import torch

from ember.shard import native
from ember.shard.cuda_graphs import DEFAULT_BATCH_SIZES, MIN_WIDTH_BLOCKS, parse_batch_sizes, width_bucket
from ember.shard.runner import Sequence, load_runner

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tokens(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def test_batch_sizes_parse_like_tgis_flag():
    assert parse_batch_sizes(None) == DEFAULT_BATCH_SIZES
    assert parse_batch_sizes("8, 1,2,2") == (1, 2, 8)
    assert parse_batch_sizes("0") == () and parse_batch_sizes("") == ()
    for bad in ("a,b", "-1", "1,0"):
        with pytest.raises(ValueError, match="cuda-graphs"):
            parse_batch_sizes(bad)


def test_width_buckets_are_powers_of_two_from_the_minimum():
    assert width_bucket(1) == MIN_WIDTH_BLOCKS
    assert width_bucket(MIN_WIDTH_BLOCKS) == MIN_WIDTH_BLOCKS
    assert width_bucket(MIN_WIDTH_BLOCKS + 1) == 2 * MIN_WIDTH_BLOCKS
    assert width_bucket(100) == 128


def _decode_both(graphed, eager, prompts, steps, drop_after=None):
    """Prefill `prompts` in both runners, then greedy decode steps; returns the bucket keys used.

    Every step's logits must agree; the eager runner's argmax feeds both, so a padding row that
    wrote into a live sequence's cache would show up in a later step."""
    seqs = {name: [Sequence(i, list(p)) for i, p in enumerate(prompts)] for name in ("g", "e")}
    used = []
    for step in range(steps + 1):
        if drop_after is not None and step == drop_after:
            for name, runner in (("g", graphed), ("e", eager)):
                runner.free(seqs[name].pop(0))
        out_g = graphed.step(seqs["g"]).logits
        out_e = eager.step(seqs["e"]).logits
        assert out_g.shape == out_e.shape
        torch.testing.assert_close(out_g.cpu(), out_e.cpu(), atol=2e-4, rtol=1e-4, msg=f"step {step}")
        used.append(set(graphed.graphs.buckets))
        nxt = out_e.argmax(-1).tolist()
        for name in ("g", "e"):
            for s, t in zip(seqs[name], nxt):
                s.token_ids.append(t)
    return used


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_fixed_shape_decode_matches_the_ragged_path(tiny_llama_dir, use_native):
    """Three sequences pad to bucket 4 (one spare-block row), one crosses into the 16-block width
    bucket, then one leaves and two pad to bucket 2; prompts never take the buckets."""
    saved = native.kernels()
    native.reset_for_tests(saved if use_native else None)
    try:
        graphed = load_runner(tiny_llama_dir, dtype="float32", device="cpu", cuda_graphs=(1, 2, 4))
        eager = load_runner(tiny_llama_dir, dtype="float32", device="cpu")
        assert eager.graphs is None and graphed.cache.scratch_block == graphed.cache.num_blocks
        assert graphed.cache.k[0].shape[0] == graphed.cache.num_blocks + 1
        vocab = graphed.info.vocab_size
        prompts = [_tokens(n, vocab, seed=n) for n in (5, 126, 40)]  # 126 + 3 new tokens: 9 blocks
        used = _decode_both(graphed, eager, prompts, steps=5, drop_after=4)
    finally:
        native.reset_for_tests(saved)
    assert used[0] == set()  # the prefill step is not a decode step
    assert used[1] == {(4, MIN_WIDTH_BLOCKS)}
    assert (4, 2 * MIN_WIDTH_BLOCKS) in used[3]  # the long sequence's context passed 128 keys
    assert any(b == 2 for b, _ in used[-1])  # after one sequence left
    assert graphed.cache.allocator.num_free == eager.cache.allocator.num_free


def test_sliding_window_layers_take_the_buckets(tiny_model_factory):
    """Mistral's window (16) is applied to the padded, masked context as to the ragged one."""
    model_dir = tiny_model_factory("mistral")
    graphed = load_runner(model_dir, dtype="float32", device="cpu", cuda_graphs=(2,))
    eager = load_runner(model_dir, dtype="float32", device="cpu")
    prompts = [_tokens(n, graphed.info.vocab_size, seed=40 + n) for n in (30, 9)]
    used = _decode_both(graphed, eager, prompts, steps=3)
    assert used[-1] == {(2, MIN_WIDTH_BLOCKS)}


def test_steps_beyond_the_largest_size_run_eagerly(tiny_llama_dir):
    graphed = load_runner(tiny_llama_dir, dtype="float32", device="cpu", cuda_graphs=(2,))
    eager = load_runner(tiny_llama_dir, dtype="float32", device="cpu")
    prompts = [_tokens(6, graphed.info.vocab_size, seed=s) for s in range(3)]
    used = _decode_both(graphed, eager, prompts, steps=2)
    assert used[-1] == set()


def test_a_replaced_cache_drops_the_buckets(tiny_llama_dir):
    """Warmup replaces the cache; buckets made for the old one must not write into freed memory."""
    runner = load_runner(tiny_llama_dir, dtype="float32", device="cpu", cuda_graphs=(1,))
    seq = Sequence(0, _tokens(4, runner.info.vocab_size, seed=1))
    runner.step([seq])
    seq.token_ids.append(7)
    runner.step([seq])
    assert len(runner.graphs.buckets) == 1
    runner.free(seq)
    runner.warmup(64, 256, memory_budget_bytes=1 << 20)
    assert runner.cache.scratch_block == runner.cache.num_blocks
    seq = Sequence(1, _tokens(4, runner.info.vocab_size, seed=1))
    runner.step([seq])
    seq.token_ids.append(7)
    runner.step([seq])
    (bucket,) = runner.graphs.buckets.values()
    assert runner.graphs._key[1] == runner.cache.k[0].data_ptr()


@CUDA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_replay_the_eager_step(tiny_llama_dir, dtype):
    """Captured graphs against the eager CUDA path, over bucket changes (batch and context width)."""
    graphed = load_runner(tiny_llama_dir, dtype=dtype, device="cuda", cuda_graphs=(1, 2, 4))
    eager = load_runner(tiny_llama_dir, dtype=dtype, device="cuda", cuda_graphs=())
    vocab = graphed.info.vocab_size
    prompts = [_tokens(n, vocab, seed=n) for n in (5, 126, 40)]
    seqs = {k: [Sequence(i, list(p)) for i, p in enumerate(prompts)] for k in "ge"}
    for step in range(7):
        if step == 5:
            for k, r in (("g", graphed), ("e", eager)):
                r.free(seqs[k].pop(0))
        out_g, out_e = graphed.step(seqs["g"]).logits, eager.step(seqs["e"]).logits
        tol = 1e-3 if dtype == "float32" else 3e-2
        rel = ((out_g - out_e).norm() / out_e.norm()).item()
        assert rel < tol, f"step {step}: relative difference {rel:.2e}"
        nxt = out_e.argmax(-1).tolist()
        for k in "ge":
            for s, t in zip(seqs[k], nxt):
                s.token_ids.append(t)
    buckets = graphed.graphs.buckets
    assert graphed.graphs.disabled_reason is None
    assert {(4, 8), (4, 16)} <= set(buckets) and any(b == 2 for b, _ in buckets)
    assert all(b.graph is not None for b in buckets.values())
