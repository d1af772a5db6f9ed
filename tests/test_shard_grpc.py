"""The shard over real gRPC: a real `ember-shard serve` process on the tiny model."""

from __future__ import annotations

import grpc
import pytest
import torch
from servers import shard_process
from transformers import AutoModelForCausalLM, AutoTokenizer

from ember.proto import generate_pb2 as pb
from ember.proto import generate_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def shard(tiny_llama_dir, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("uds") / "shard")
    # 1 MiB of KV cache: ~2000 tokens of the tiny model, so "out of blocks" is reachable.
    with shard_process(tiny_llama_dir, prefix, "--kv-cache-bytes", str(1 << 20)) as socket:
        channel = grpc.insecure_channel(f"unix://{socket}")
        yield pb_grpc.TextGenerationServiceStub(channel)
        channel.close()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            min_new_tokens=n,
        )
    return out[0, len(ids) :].tolist()


def request(rid: int, ids: list[int], max_new: int, **params) -> pb.Request:
    params.setdefault("temperature", 1.0)
    params.setdefault("top_p", 1.0)
    params.setdefault("typical_p", 1.0)
    params.setdefault("repetition_penalty", 1.0)
    return pb.Request(
        id=rid,
        input_ids=ids,
        parameters=pb.NextTokenChooserParameters(**params),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
    )


def collect(tokens: dict[int, list[int]], generations) -> None:
    for g in generations:
        tokens.setdefault(g.request_id, []).extend(g.tokens.ids)


def test_info_and_health(shard):
    info = shard.Info(pb.InfoRequest())
    assert info.attention_impl == "paged"
    assert info.model_type == "llama"
    assert info.block_size == 16
    assert 2 in info.eos_token_ids
    shard.Health(pb.HealthRequest())
    urls = shard.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
    assert len(urls) == 1 and urls[0].startswith("unix://")


def test_ragged_prefill_merge_and_filter_match_transformers(shard, reference, tokenizer):
    prompts = [
        "The capital of France is",
        "Hello world! How are you today? I am fine, thank you. Once upon a time",
        "def add(a, b):",
        "Emoji: 🎉🔥 and CJK 你好",
    ]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    n = 12
    expected = [greedy_reference(reference, i, n) for i in ids]

    tokens: dict[int, list[int]] = {}
    first = shard.Prefill(
        pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request(r, ids[r], n) for r in range(3)], size=3))
    )
    collect(tokens, first.generations)
    cached = first.batch
    for _ in range(3):
        step = shard.Decode(pb.DecodeRequest(batches=[cached]))
        collect(tokens, step.generations)
        cached = step.batch

    # A 4th request joins mid-way: prefilled alone, then merged by Decode.
    late = shard.Prefill(pb.PrefillRequest(batch=pb.Batch(id=2, requests=[request(3, ids[3], n)], size=1)))
    collect(tokens, late.generations)
    merged = shard.Decode(pb.DecodeRequest(batches=[cached, late.batch]))
    collect(tokens, merged.generations)
    cached = merged.batch
    assert sorted(cached.request_ids) == [0, 1, 2, 3]

    # Request 1 leaves mid-way: filtered out, the rest go on.
    cached = shard.FilterBatch(pb.FilterBatchRequest(batch_id=cached.id, request_ids=[0, 2, 3])).batch
    assert list(cached.request_ids) == [0, 2, 3]
    while cached is not None and cached.size:
        step = shard.Decode(pb.DecodeRequest(batches=[cached]))
        collect(tokens, step.generations)
        cached = step.batch if step.HasField("batch") else None

    for r in (0, 2, 3):
        assert tokens[r] == expected[r], f"request {r}"
    assert tokens[1] == expected[1][: len(tokens[1])]
    assert len(tokens[1]) == 5


def test_prefill_beside_the_running_batch_matches_transformers(shard, reference, tokenizer):
    """TGI v3's Prefill with cached_batch: new prompts and running decodes in one forward."""
    assert shard.Info(pb.InfoRequest()).shared_prefill
    prompts = [
        "The capital of France is",
        "Hello world! How are you today?",
        "def add(a, b):",
        "Once upon a time there was a",
        "Emoji: 🎉🔥 and CJK 你好",
    ]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    n = 10
    expected = [greedy_reference(reference, i, n) for i in ids]
    tokens: dict[int, list[int]] = {}
    first = shard.Prefill(
        pb.PrefillRequest(batch=pb.Batch(id=40, requests=[request(r, ids[r], n) for r in (0, 1)], size=2))
    )
    collect(tokens, first.generations)
    cached = shard.Decode(pb.DecodeRequest(batches=[first.batch]))
    collect(tokens, cached.generations)
    cached = cached.batch

    # Two newcomers (one asking for prompt logprobs) join in the running batch's forward.
    late = [request(r, ids[r], n) for r in (2, 3)]
    late[1].prefill_logprobs = True
    joined = shard.Prefill(pb.PrefillRequest(batch=pb.Batch(id=41, requests=late, size=2), cached_batch=cached))
    assert [g.request_id for g in joined.generations] == [0, 1, 2, 3]
    assert joined.HasField("concat_ns")
    assert [len(g.prefill_tokens.ids) for g in joined.generations] == [0, 0, 0, len(ids[3])]
    collect(tokens, joined.generations)
    cached = joined.batch
    assert list(cached.request_ids) == [0, 1, 2, 3]

    # A bad newcomer is refused and leaves the running batch as it was.
    with pytest.raises(grpc.RpcError) as bad:
        shard.Prefill(
            pb.PrefillRequest(batch=pb.Batch(id=42, requests=[request(9, [10**6], n)], size=1), cached_batch=cached)
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unknown:
        shard.Prefill(
            pb.PrefillRequest(
                batch=pb.Batch(id=43, requests=[request(9, ids[4], n)], size=1),
                cached_batch=pb.CachedBatch(id=997, request_ids=[1], size=1),
            )
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    # One more joins while request 1 has been dropped by the router (listed no more, no FilterBatch).
    cached = pb.CachedBatch(id=cached.id, request_ids=[0, 2, 3], size=3)
    joined = shard.Prefill(
        pb.PrefillRequest(batch=pb.Batch(id=44, requests=[request(4, ids[4], n)], size=1), cached_batch=cached)
    )
    collect(tokens, joined.generations)
    cached = joined.batch
    assert list(cached.request_ids) == [0, 2, 3, 4]
    while cached is not None and cached.size:
        step = shard.Decode(pb.DecodeRequest(batches=[cached]))
        collect(tokens, step.generations)
        cached = step.batch if step.HasField("batch") else None
    for r in (0, 2, 3, 4):
        assert tokens[r] == expected[r], f"request {r}"
    assert tokens[1] == expected[1][:3]


def test_seeded_sampling_is_independent_of_batch_neighbours(shard, tokenizer):
    ids = tokenizer("Once upon a time")["input_ids"]
    sampled = dict(do_sample=True, temperature=1.3, seed=1234)

    def run(batch_id: int, requests: list[pb.Request]) -> dict[int, list[int]]:
        tokens: dict[int, list[int]] = {}
        out = shard.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests))))
        collect(tokens, out.generations)
        cached = out.batch if out.HasField("batch") else None
        while cached is not None:
            out = shard.Decode(pb.DecodeRequest(batches=[cached]))
            collect(tokens, out.generations)
            cached = out.batch if out.HasField("batch") else None
        return tokens

    alone = run(10, [request(100, ids, 10, **sampled)])[100]
    others = [
        request(101, tokenizer("The quick brown fox")["input_ids"], 6, do_sample=True, temperature=0.7, seed=7),
        request(102, tokenizer("Hello")["input_ids"], 10),
        request(103, ids, 10, do_sample=True, temperature=1.3, seed=99),
    ]
    together = run(11, [others[0], request(100, ids, 10, **sampled), *others[1:]])
    assert together[100] == alone
    assert together[103] != alone  # another seed gives other tokens


def test_bad_calls_get_a_status_and_the_shard_keeps_serving(shard, tokenizer):
    with pytest.raises(grpc.RpcError) as empty:
        shard.Prefill(pb.PrefillRequest(batch=pb.Batch(id=20, requests=[request(1, [], 4)], size=1)))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no input tokens" in empty.value.details()

    with pytest.raises(grpc.RpcError) as unknown:
        shard.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=999, request_ids=[1], size=1)]))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as filt:
        shard.FilterBatch(pb.FilterBatchRequest(batch_id=998, request_ids=[1]))
    assert filt.value.code() == grpc.StatusCode.NOT_FOUND

    huge = [5] * 5000  # more tokens than the KV cache holds
    with pytest.raises(grpc.RpcError) as full:
        shard.Prefill(pb.PrefillRequest(batch=pb.Batch(id=21, requests=[request(1, huge, 4)], size=1)))
    assert full.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)

    out = shard.Prefill(
        pb.PrefillRequest(batch=pb.Batch(id=22, requests=[request(1, tokenizer("Hello")["input_ids"], 1)], size=1))
    )
    assert out.generations[0].HasField("generated_text")
    assert not out.HasField("batch")  # finished at its first token: nothing cached
    shard.Health(pb.HealthRequest())


def test_prefill_logprobs_top_n_and_clear_cache(shard, tokenizer):
    ids = tokenizer("The capital of France is")["input_ids"]
    req = request(30, ids, 8, top_p=1.0)
    req.top_n_tokens = 3
    req.prefill_logprobs = True
    out = shard.Prefill(pb.PrefillRequest(batch=pb.Batch(id=30, requests=[req], size=1)))
    gen = out.generations[0]
    assert list(gen.prefill_tokens.ids) == ids
    assert len(gen.prefill_tokens.logprobs) == len(ids)
    assert all(lp <= 0 for lp in gen.prefill_tokens.logprobs[1:])
    assert len(gen.top_tokens) == 1 and len(gen.top_tokens[0].ids) == 3
    assert gen.tokens.ids[0] == gen.top_tokens[0].ids[0]  # greedy picks the top token
    shard.ClearCache(pb.ClearCacheRequest(id=30))
    with pytest.raises(grpc.RpcError):
        shard.Decode(pb.DecodeRequest(batches=[out.batch]))


def test_embed_is_normalised(shard, tokenizer):
    out = shard.Embed(
        pb.EmbedRequest(
            inputs=[
                pb.EmbedInput(input_ids=tokenizer("Hello world")["input_ids"]),
                pb.EmbedInput(input_ids=tokenizer("Paris")["input_ids"]),
            ]
        )
    )
    assert len(out.embeddings) == 2
    for e in out.embeddings:
        norm = sum(v * v for v in e.values) ** 0.5
        assert abs(norm - 1.0) < 1e-4
    assert out.embeddings[0].values != out.embeddings[1].values
