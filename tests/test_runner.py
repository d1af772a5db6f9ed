"""PagedRunner behaviour: atomic block allocation, freeing, embeddings, warmup sizing, info, weights, TP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import assert_ranks_give, ragged_steps, run_two_ranks

from ember.shard.kv_cache import OutOfBlocks
from ember.shard.runner import Sequence, WarmupError, load_runner
from ember.shard.weights import TensorParallelError, Weights

TINY_BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K+V, 2 layers, 16 tokens, 2 KV heads, head_dim 16, float32


def _toks(n: int, offset: int = 3) -> list[int]:
    return [(offset + 7 * i) % 500 + 3 for i in range(n)]


@pytest.fixture
def small_runner(tiny_llama_dir):
    """A runner whose cache holds exactly 4 blocks (64 tokens)."""
    return load_runner(tiny_llama_dir, dtype="float32", device="cpu", kv_cache_bytes=4 * TINY_BLOCK_BYTES)


def test_info_reports_model_facts(tiny_llama_dir):
    runner = load_runner(tiny_llama_dir)
    info = runner.info
    assert info.eos_token_ids == [2] and info.pad_token_id == 0
    assert (info.model_type, info.attention_impl, info.dtype, info.device_type) == ("llama", "paged", "float32", "cpu")
    assert info.block_size == 16 and info.window_size is None and not info.requires_padding
    assert info.hidden_size == 64 and info.max_position_embeddings == 512 and info.world_size == 1
    assert runner.step([Sequence(0, _toks(3))]).logits.shape == (1, info.vocab_size)


def test_out_of_blocks_has_no_side_effects(small_runner):
    a = Sequence(0, _toks(40))  # 3 blocks
    small_runner.step([a])
    assert small_runner.cache.allocator.num_free == 1
    a.token_ids.append(5)
    b = Sequence(1, _toks(20, offset=9))  # 2 blocks: one too many
    with pytest.raises(OutOfBlocks):
        small_runner.step([a, b])
    assert (a.num_cached, len(a.blocks), b.blocks, b.num_cached) == (40, 3, [], 0)
    assert small_runner.cache.allocator.num_free == 1
    small_runner.free(a)
    assert small_runner.cache.allocator.num_free == 4 and a.blocks == []
    out = small_runner.step([b])
    assert b.num_cached == 20 and len(b.blocks) == 2 and out.logits.shape[0] == 1


def test_step_rejects_sequences_without_new_tokens(small_runner):
    a = Sequence(0, _toks(4))
    small_runner.step([a])
    with pytest.raises(ValueError, match="uncached"):
        small_runner.step([a])


def test_embed_is_pooled_normalised_and_batch_independent(small_runner):
    lists = [_toks(5), _toks(11, offset=40), _toks(2, offset=90)]
    free_before = small_runner.cache.allocator.num_free
    batched = small_runner.embed(lists)
    assert batched.shape == (3, 64) and batched.dtype == torch.float32
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(batched[1], small_runner.embed([lists[1]])[0], atol=1e-5, rtol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 1e-3
    assert small_runner.cache.allocator.num_free == free_before


def test_embed_matches_transformers_mean_pool(tiny_llama_dir):
    from transformers import AutoModel

    toks = _toks(9)
    ref_model = AutoModel.from_pretrained(tiny_llama_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.inference_mode():
        hidden = ref_model(input_ids=torch.tensor([toks])).last_hidden_state[0]
    ref = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
    torch.testing.assert_close(load_runner(tiny_llama_dir).embed([toks])[0], ref, atol=1e-4, rtol=1e-4)


def test_warmup_sizes_cache_from_budget(small_runner):
    capacity = small_runner.warmup(
        max_prefill_tokens=100, max_total_tokens=64, memory_budget_bytes=10 * TINY_BLOCK_BYTES
    )
    assert capacity == 160
    assert small_runner.cache.num_blocks == 10 and small_runner.cache.allocator.num_free == 10
    assert small_runner.step([Sequence(0, _toks(150))]).logits.shape[0] == 1


def test_warmup_refuses_a_budget_below_one_sequence(small_runner):
    with pytest.raises(WarmupError, match="max_total_tokens=200"):
        small_runner.warmup(max_prefill_tokens=64, max_total_tokens=200, memory_budget_bytes=4 * TINY_BLOCK_BYTES)


def test_warmup_uses_kv_cache_bytes_flag(tiny_llama_dir):
    runner = load_runner(tiny_llama_dir, kv_cache_bytes=7 * TINY_BLOCK_BYTES)
    assert runner.warmup(max_prefill_tokens=32, max_total_tokens=32) == 7 * 16


def test_weights_refuse_heads_not_divisible(tiny_llama_dir):
    with pytest.raises(TensorParallelError, match="num_attention_heads=4 is not divisible by --num-shard 3"):
        Weights(tiny_llama_dir, torch.float32, "cpu", rank=0, world_size=3)
    with pytest.raises(TensorParallelError, match="num_key_value_heads=2 .* 4"):
        Weights(tiny_llama_dir, torch.float32, "cpu", rank=0, world_size=4)


def test_weights_read_only_this_ranks_slice(tiny_llama_dir):
    full = Weights(tiny_llama_dir, torch.float32, "cpu")
    name = "model.layers.0.self_attn.q_proj.weight"
    whole = full.get(name)
    for rank in range(2):
        w = Weights(tiny_llama_dir, torch.float32, "cpu", rank=rank, world_size=2)
        torch.testing.assert_close(w.get_sharded(name, dim=0), whole.chunk(2, 0)[rank])
        torch.testing.assert_close(w.get_sharded(name, dim=1), whole.chunk(2, 1)[rank])
    assert full.has(name) and not full.has("nope")
    assert full.get(name).dtype == torch.float32
    assert Weights(tiny_llama_dir, torch.bfloat16, "cpu").get(name).dtype == torch.bfloat16


def test_weights_pad_a_vocabulary_that_does_not_divide(tmp_path):
    whole = torch.randn(7, 4)
    save_file({"embed.weight": whole}, tmp_path / "model.safetensors")
    parts = [
        Weights(tmp_path, torch.float32, "cpu", rank=r, world_size=2).get_sharded("embed.weight", 0, allow_padding=True)
        for r in range(2)
    ]
    assert parts[0].shape == parts[1].shape == (4, 4)
    torch.testing.assert_close(torch.cat(parts)[:7], whole)
    assert parts[1][-1].abs().sum() == 0
    with pytest.raises(TensorParallelError, match="size 7 is not divisible by world size 2"):
        Weights(tmp_path, torch.float32, "cpu", rank=0, world_size=2).get_sharded("embed.weight", 0)


def test_sharded_checkpoint_with_index(tiny_llama_dir, tmp_path):
    """Weights split over two files with an index json load to the same logits."""
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in ("config.json", "generation_config.json"):
        if (tiny_llama_dir / f).exists():
            (tmp_path / f).write_text((tiny_llama_dir / f).read_text())
    toks = _toks(10)
    got = load_runner(tmp_path).step([Sequence(0, list(toks))]).logits
    want = load_runner(tiny_llama_dir).step([Sequence(0, list(toks))]).logits
    torch.testing.assert_close(got, want)


def test_generic_path_refuses_tensor_parallel(tiny_gpt2_dir):
    with pytest.raises(ValueError, match="TP=1.*world size is 2"):
        load_runner(tiny_gpt2_dir, world_size=2)


def test_generic_runner_embed_and_warmup(tiny_gpt2_dir):
    runner = load_runner(tiny_gpt2_dir)
    out = runner.embed([_toks(4), _toks(9)])
    torch.testing.assert_close(out[1], runner.embed([_toks(9)])[0], atol=1e-5, rtol=1e-5)
    assert runner.warmup(64, 32, memory_budget_bytes=1 << 20) == (1 << 20) // (2 * 2 * 64 * 4)
    with pytest.raises(WarmupError):
        runner.warmup(64, 32, memory_budget_bytes=1000)


# --- tensor parallelism over gloo (two processes) ------------------------------------------------


def _scripted_steps(runner) -> list[torch.Tensor]:
    """Prefill two ragged sequences (with prompt logits), four decode steps, then an embedding."""
    results = ragged_steps(runner, _toks(21), _toks(7, offset=50), appended=(10, 20))
    results.append(runner.embed([_toks(6)]))
    return results


def _tp_worker(rank: int, model_dir: str, port: int, out_dir: str) -> None:
    from ember.shard.dist import init_distributed

    torch.set_num_threads(1)
    group = init_distributed(rank, 2, "127.0.0.1", port, "cpu")
    runner = load_runner(model_dir, rank=rank, world_size=2, group=group)
    assert runner.model.kv_heads_per_rank == 1 and runner.cache.k[0].shape[2] == 1
    torch.save(_scripted_steps(runner), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("variant, overrides", [("llama", {}), ("qwen2", {"vocab_size": 601})])
def test_tensor_parallel_two_ranks_match_one(tiny_model_factory, tmp_path, variant, overrides):
    """Tied embeddings (llama) and qkv bias with a vocabulary that does not divide by 2 (qwen2)."""
    model_dir = tiny_model_factory(variant, **overrides)
    assert_ranks_give(run_two_ranks(_tp_worker, model_dir, tmp_path), _scripted_steps(load_runner(model_dir)))


def test_load_runner_needs_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_runner(tmp_path)
