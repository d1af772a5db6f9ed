"""Prompt chunks paced by time: the router's estimates from step replies, and the shard obeying the
budget each Prefill and Decode carries."""

from __future__ import annotations

import pytest
from shard_requests import shard_request
from transformers import AutoTokenizer

from ember.proto import generate_pb2 as pb
from ember.router.pacer import FACTOR, FLOOR_S, MIN_TOKENS, Pacer
from ember.shard.engine import Engine
from ember.shard.grammar import GrammarCompiler
from ember.shard.runner import load_runner

MS = 1_000_000  # ns


def test_budget_fits_prompt_tokens_in_a_multiple_of_the_decode_time():
    pacer = Pacer(cap=1024)
    assert pacer.budget(16) == 0  # nothing measured: the shard's own chunk
    pacer.observe(16, 0, 40 * MS)  # 2.5 ms per running request
    assert pacer.budget(16) == 0  # no prompt cost measured yet
    pacer.observe(16, 40, 60 * MS)  # 40 prompt tokens added 20 ms: 0.5 ms each
    decode = 0.040
    target = max(FACTOR * decode, FLOOR_S)
    assert pacer.budget(16) == int((target - decode) / 0.0005)
    assert pacer.budget(1) == int((FLOOR_S - decode / 16) / 0.0005)  # few streams: the floor's room
    assert pacer.budget(0) == 0  # nobody waits: the whole chunk
    for _ in range(40):  # prompts get dearer (longer contexts): the estimate follows
        pacer.observe(16, 40, 4000 * MS)
    assert pacer.budget(16) == MIN_TOKENS  # never below a block
    for _ in range(40):
        pacer.observe(16, 200, 41 * MS)
    assert pacer.budget(16) == 1024  # cheap prompts: up to the chunk


def test_a_fixed_target_and_pacing_off():
    fixed = Pacer(cap=256, target_ms=30)
    fixed.observe(10, 0, 10 * MS)
    fixed.observe(10, 100, 30 * MS)
    assert fixed.budget(10) == 100  # (30 - 10) ms at 0.2 ms a token
    off = Pacer(cap=256, target_ms=0)
    off.observe(10, 0, 10 * MS)
    off.observe(10, 100, 30 * MS)
    assert not off.enabled and off.budget(10) == 0


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    runner = load_runner(tiny_llama_dir, dtype="float32", device="cpu")
    return Engine(runner, tokenizer, GrammarCompiler(tokenizer), prefill_chunk=64)


def _request(rid: int, n: int, max_new: int) -> pb.Request:
    return shard_request(rid, [(rid * 13 + 7 * i) % 300 + 5 for i in range(n)], max_new)


def test_the_shard_runs_at_most_the_budget_and_says_what_it_ran(engine):
    first = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[_request(1, 10, 20)], size=1)))
    assert (first.decode_rows, first.prompt_tokens) == (0, 10)
    call = pb.PrefillRequest(batch=pb.Batch(id=2, requests=[_request(2, 50, 4)], size=1), prompt_budget=16)
    call.cached_batch.CopyFrom(first.batch)
    reply = engine.prefill(call)
    assert (reply.decode_rows, reply.prompt_tokens) == (1, 16)  # 16 of the 50, beside the running one
    ran = [(1, 16)]
    cached = reply.batch
    while len(ran) < 5:
        reply = engine.decode(pb.DecodeRequest(batches=[cached], prompt_budget=16))
        cached = reply.batch
        ran.append((reply.decode_rows, reply.prompt_tokens))
    # The prompt's 50 tokens in budgets of 16 beside the running request, then both decode.
    assert ran == [(1, 16), (1, 16), (1, 16), (1, 2), (2, 0)]
    engine.clear(None)
    big = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=3, requests=[_request(3, 10, 20)], size=1)))
    call = pb.PrefillRequest(batch=pb.Batch(id=4, requests=[_request(4, 100, 4)], size=1), prompt_budget=1000)
    call.cached_batch.CopyFrom(big.batch)
    assert engine.prefill(call).prompt_tokens == 64  # never above the shard's own chunk
    engine.clear(None)
