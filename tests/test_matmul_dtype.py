"""bfloat16 matmuls under float32 activations (`--matmul-dtype bfloat16`), on a real tiny Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import step_logits

from ember.shard import native
from ember.shard.layers import OneDNNWeight
from ember.shard.models.llama import RESCORED_CANDIDATES
from ember.shard.runner import Sequence, load_runner

PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 8, 9]]


def _logits(runner, prompts):
    return step_logits(runner, prompts)


def test_linear_weights_are_bf16_and_the_rest_float32(tiny_llama_dir):
    runner = load_runner(tiny_llama_dir, dtype="float32", matmul_dtype="bfloat16")
    layer = runner.model.layers[0]
    assert layer.attn.qkv.weight.dtype == torch.bfloat16
    assert layer.mlp.down.weight.dtype == torch.bfloat16
    assert layer.input_norm.weight.dtype == torch.float32
    assert runner.model.lm_head.weight.dtype == torch.float32  # exact rows for the rescored candidates
    assert runner.cache.k[0].dtype == torch.bfloat16  # --kv-cache-dtype auto follows the matmuls on CPU
    assert runner.info.dtype == "float32"


def test_logits_stay_close_to_float32_and_best_candidates_are_exact(tiny_llama_dir):
    exact = load_runner(tiny_llama_dir, dtype="float32")
    mixed = load_runner(tiny_llama_dir, dtype="float32", matmul_dtype="bfloat16")
    for ref, got in zip(_logits(exact, PROMPTS), _logits(mixed, PROMPTS)):
        assert got.dtype == torch.float32
        # bf16 keeps ~3 significant digits: errors stay a small fraction of the logits' spread.
        assert (got - ref).abs().max() < 0.1 * ref.std()
    # The rescored candidates carry float32 head logits of the (bf16-computed) hidden state. The
    # hidden state is recomputed below by the modules without a cache; the fused step would read the
    # prompt's keys back from the bf16 cache instead (the fused step is tested in test_native.py).
    mixed.model.fused = None
    seq = Sequence(0, list(PROMPTS[0]))
    hidden_logits = mixed.step([seq]).logits[0]
    mixed.free(seq)
    from ember.shard.attention import AttentionMetadata

    ids = torch.tensor(PROMPTS[0])
    meta = AttentionMetadata.build([0], [len(PROMPTS[0])], None, mixed.block_size, torch.device("cpu"))
    with torch.inference_mode():
        hidden = mixed.model(ids, meta, None)[-1:]
        full = F.linear(hidden, mixed.model.lm_head.weight)[0]
    best = hidden_logits.topk(RESCORED_CANDIDATES).indices
    torch.testing.assert_close(hidden_logits[best], full[best], atol=1e-5, rtol=1e-5)


def test_float32_default_is_untouched(tiny_llama_dir):
    runner = load_runner(tiny_llama_dir, dtype="float32")
    assert runner.model.fast_head is None
    assert runner.model.layers[0].attn.qkv.weight.dtype == torch.float32


def test_cpu_linear_weights_are_reordered_once_for_onednn(tiny_llama_dir):
    """On CPU the linear weights live in oneDNN's layout (float32, and bf16 where Ember's bf16 kernel
    cannot run), with the same products."""
    for dtype, matmul, tol in (("float32", None, 1e-5), ("float32", "bfloat16", 2e-2)):
        runner = load_runner(tiny_llama_dir, dtype=dtype, matmul_dtype=matmul)
        weight = runner.model.layers[0].mlp.gate_up.weight
        if isinstance(weight, native.BF16Weight):
            assert matmul == "bfloat16" and native.kernels().bf16
            continue
        if not OneDNNWeight.usable(torch.device("cpu"), weight.dtype):
            assert isinstance(weight, torch.Tensor)
            continue
        assert isinstance(weight, OneDNNWeight) and weight.shape == (256, 64)
        x = torch.randn(5, 3, 64).to(weight.dtype)
        plain = F.linear(x, weight.dense())
        out = weight.linear(x)
        assert out.shape == (5, 3, 256) and out.dtype == weight.dtype
        torch.testing.assert_close(out.float(), plain.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("rows", [1, 5, 12, 13, 32, 40])
@pytest.mark.parametrize("shape", [(48, 64), (64, 96), (256, 64)])
def test_bf16_kernel_matches_bf16_inputs_with_float32_sums(rows, shape):
    """Ember's bf16 kernel: activations rounded to bf16 as torch rounds them, float32 sums, per row
    (odd tile counts, row counts across its 12-row passes)."""
    if native.kernels() is None or not native.kernels().bf16:
        pytest.skip("needs Ember's AVX-512 BF16 kernels")
    n, k = shape
    g = torch.Generator().manual_seed(rows * 1000 + n)
    weight = torch.randn(n, k, generator=g)
    packed = native.BF16Weight.pack(weight)
    assert torch.equal(packed.dense(), weight.to(torch.bfloat16))
    x = torch.randn(rows, k, generator=g)
    want = x.to(torch.bfloat16).double() @ weight.to(torch.bfloat16).double().T
    got = packed.linear(x)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    alone = packed.linear(x[-1:].clone())  # a row's numbers do not depend on the batch
    assert torch.equal(alone[0], got[-1])


def test_bf16_matmuls_take_the_fused_step_where_the_kernel_runs(tiny_llama_dir):
    runner = load_runner(tiny_llama_dir, dtype="float32", matmul_dtype="bfloat16")
    kernels = native.kernels()
    if kernels is None or not kernels.bf16:
        assert runner.model.fused is None
        return
    assert runner.model.fused is not None and runner.model.fused.bf16_weights
    assert isinstance(runner.model.fast_head, native.BF16Weight)
