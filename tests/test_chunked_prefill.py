"""Chunked prefill on the shard: a long prompt runs a chunk per step beside the running requests.

The engine is driven in process the way the router drives it (Prefill, then a
Prefill carrying the running batch, then Decodes), once with chunks and once
with whole prompts: every request must get the same tokens, the running one a
token every step, and no step may run more prompt tokens than the chunk.
"""

from __future__ import annotations

import math

import pytest
from shard_requests import shard_request
from transformers import AutoTokenizer

from ember.proto import generate_pb2 as pb
from ember.shard.engine import Engine
from ember.shard.grammar import GrammarCompiler
from ember.shard.runner import Sequence, load_runner

CHUNK = 8


def _ids(n: int, offset: int) -> list[int]:
    return [(offset + 11 * i) % 400 + 5 for i in range(n)]


_request = shard_request


@pytest.fixture(scope="module")
def parts(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return tokenizer, GrammarCompiler(tokenizer)


def _serve(tiny_llama_dir, parts, chunk: int, newcomer: pb.Request) -> tuple[dict, list[list[int]], list[int]]:
    """A running request (repetition penalty) decodes; `newcomer` joins it after two steps.
    Returns each request's tokens, the ids that got a token at each call, and each forward's token count."""
    tokenizer, grammar = parts
    runner = load_runner(tiny_llama_dir, dtype="float32", device="cpu")
    forwards: list[int] = []
    step = runner.step

    def counted(seqs, want_prompt_logits=False, num_new=None):
        forwards.append(sum(num_new) if num_new else sum(len(s.token_ids) - s.num_cached for s in seqs))
        return step(seqs, want_prompt_logits, num_new)

    runner.step = counted
    engine = Engine(runner, tokenizer, grammar, prefill_chunk=chunk)
    tokens: dict[int, list[int]] = {}
    per_call: list[list[int]] = []
    prefills: dict[int, pb.Tokens] = {}

    def record(reply) -> pb.CachedBatch | None:
        per_call.append([g.request_id for g in reply.generations])
        for g in reply.generations:
            tokens.setdefault(g.request_id, []).extend(g.tokens.ids)
            if g.HasField("prefill_tokens"):
                prefills[g.request_id] = g.prefill_tokens
        return reply.batch if reply.HasField("batch") else None

    running = _request(1, _ids(5, 1), 16, repetition_penalty=1.3)
    cached = record(engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=[running], size=1))))
    for _ in range(2):
        cached = record(engine.decode(pb.DecodeRequest(batches=[cached])))
    joined = pb.PrefillRequest(batch=pb.Batch(id=1, requests=[newcomer], size=1))
    joined.cached_batch.CopyFrom(cached)
    cached = record(engine.prefill(joined))
    while cached is not None:
        cached = record(engine.decode(pb.DecodeRequest(batches=[cached])))
    assert not engine.batches and runner.cache.allocator.num_free == runner.cache.num_blocks
    tokens["prefill"] = prefills
    return tokens, per_call, forwards


@pytest.mark.parametrize("params", [{}, {"do_sample": True, "seed": 7, "top_k": 20}], ids=["greedy", "seeded"])
def test_a_long_prompt_runs_a_chunk_per_step_and_gets_the_same_tokens(tiny_llama_dir, parts, params):
    prompt = _ids(5 * CHUNK - 3, 2)  # five chunks, the last one short
    newcomer = _request(2, prompt, 6, **params)
    whole, whole_calls, whole_forwards = _serve(tiny_llama_dir, parts, 0, newcomer)
    chunked, calls, forwards = _serve(tiny_llama_dir, parts, CHUNK, newcomer)

    assert chunked[1] == whole[1] and len(chunked[1]) == 16
    assert chunked[2] == whole[2] and len(chunked[2]) == 6  # seeded draws too: none is spent on a chunk
    chunks = math.ceil(len(prompt) / CHUNK)
    # calls: prefill, 2 decodes, then the newcomer's prompt in `chunks` steps, its first token in the last
    assert calls[3 : 3 + chunks] == [[1]] * (chunks - 1) + [[1, 2]]
    assert whole_calls[3] == [1, 2]
    assert max(forwards[3:]) <= CHUNK + 1 and max(whole_forwards) == len(prompt) + 1
    assert all(1 in c for c in calls[:16])  # the running request had a token at every call


def test_a_prompt_asking_for_its_logprobs_runs_whole(tiny_llama_dir, parts):
    prompt = _ids(3 * CHUNK, 4)
    tokens, calls, forwards = _serve(tiny_llama_dir, parts, CHUNK, _request(2, prompt, 3, prefill_logprobs=True))
    assert calls[3] == [1, 2] and max(forwards) == len(prompt) + 1
    assert list(tokens["prefill"][2].ids) == prompt


def test_prompts_within_the_chunk_run_as_before(tiny_llama_dir, parts):
    tokens, calls, forwards = _serve(tiny_llama_dir, parts, CHUNK, _request(2, _ids(CHUNK, 6), 3))
    assert calls[3] == [1, 2] and forwards[3] == CHUNK + 1


def test_runner_refuses_chunks_beyond_a_sequences_uncached_tokens(tiny_llama_dir):
    runner = load_runner(tiny_llama_dir, dtype="float32", device="cpu")
    seq = Sequence(0, _ids(10, 1))
    for bad in ([0], [11], [1, 1]):
        with pytest.raises(ValueError):
            runner.step([seq], num_new=bad)
    runner.step([seq], num_new=[4])
    assert seq.num_cached == 4
    out = runner.step([seq], num_new=[6])
    assert seq.num_cached == 10 and out.logits.shape[0] == 1
