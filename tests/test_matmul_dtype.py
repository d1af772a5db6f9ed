"""bfloat16 matmuls under float32 activations (`--matmul-dtype bfloat16`), on a real tiny Llama."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.shard.layers import OneDNNWeight
from ember.shard.models.llama import RESCORED_CANDIDATES
from ember.shard.runner import Sequence, load_runner
from tiny import step_logits

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
    # The rescored candidates carry float32 head logits of the (bf16-computed) hidden state.
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
    """On CPU the linear weights live in oneDNN's layout (float32 and bf16), with the same products."""
    for dtype, matmul, tol in (("float32", None, 1e-5), ("float32", "bfloat16", 2e-2)):
        runner = load_runner(tiny_llama_dir, dtype=dtype, matmul_dtype=matmul)
        weight = runner.model.layers[0].mlp.gate_up.weight
        if not OneDNNWeight.usable(torch.device("cpu"), weight.dtype):
            assert isinstance(weight, torch.Tensor)
            continue
        assert isinstance(weight, OneDNNWeight) and weight.shape == (256, 64)
        x = torch.randn(5, 3, 64).to(weight.dtype)
        plain = F.linear(x, weight.dense())
        out = weight.linear(x)
        assert out.shape == (5, 3, 256) and out.dtype == weight.dtype
        torch.testing.assert_close(out.float(), plain.float(), atol=tol, rtol=tol)
