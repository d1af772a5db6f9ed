"""Automatic prefix caching: the block allocator's table, and the engine serving the same tokens with
caching on and off while prompts that share a beginning compute it once.

The engine is driven in process as the router drives it (Prefill, Prefill beside the running batch,
Decode), on a tiny Llama whose KV blocks hold 16 tokens.
"""

from __future__ import annotations

import pytest
from shard_requests import shard_request
from transformers import AutoTokenizer

from ember import prefix
from ember.proto import generate_pb2 as pb
from ember.router.queue import Entry, Queue
from ember.shard.engine import Engine
from ember.shard.grammar import GrammarCompiler
from ember.shard.kv_cache import BlockAllocator, OutOfBlocks
from ember.shard.runner import load_runner

BS = 16


# --- the allocator ------------------------------------------------------------------------------


def _names(n: int, salt: int = 0) -> list[bytes]:
    return prefix.extend([], [salt * 1000 + i for i in range(n * BS)], BS, n)


def test_registered_blocks_are_shared_counted_and_kept_idle_after_their_last_user():
    alloc = BlockAllocator(6)
    names = _names(2)
    a = alloc.allocate(2)
    assert [alloc.register(b, n) for b, n in zip(a, names)] == a
    assert alloc.lookup(names[0]) == a[0] and alloc.refs(a[0]) == 2  # a second user
    assert alloc.lookup(_names(1, salt=9)[0]) is None
    alloc.free(a)
    assert alloc.refs(a[0]) == 1 and alloc.refs(a[1]) == 0 and alloc.num_idle == 1
    assert alloc.num_free == 5  # 4 free + the idle one, which an allocation may evict
    alloc.free([a[0]])
    assert alloc.num_idle == 2 and alloc.num_cached == 2
    assert alloc.lookup(names[1]) == a[1] and alloc.num_idle == 1  # taken back from idle
    alloc.free([a[1]])


def test_same_tokens_computed_twice_keep_one_block():
    alloc = BlockAllocator(4)
    name = _names(1)[0]
    first, second = alloc.allocate(2)
    assert alloc.register(first, name) == first
    assert alloc.register(second, name) == first  # the second holder moves to the first block
    assert alloc.refs(first) == 2 and alloc.refs(second) == 0 and alloc.num_free == 3


def test_eviction_takes_idle_blocks_least_recently_used_tail_first_and_never_one_in_use():
    alloc = BlockAllocator(6)
    old, recent, busy = _names(2, salt=1), _names(2, salt=2), _names(1, salt=3)
    blocks = {}
    for key, names in (("old", old), ("recent", recent), ("busy", busy)):
        got = alloc.allocate(len(names))
        blocks[key] = [alloc.register(b, n) for b, n in zip(got, names)]
    alloc.free(blocks["old"])
    alloc.free(blocks["recent"])  # `busy` keeps its user
    assert alloc.num_free == 1 + 4
    fresh = alloc.allocate(2)  # the free block, then the oldest idle one: `old`'s tail
    assert blocks["old"][1] in fresh and alloc.lookup(old[1]) is None
    assert alloc.lookup(old[0]) == blocks["old"][0]  # its head is still cached
    alloc.free([blocks["old"][0]])
    alloc.allocate(3)  # recent's tail, recent's head, then old's head (used after them)
    assert alloc.lookup(old[0]) is None and alloc.lookup(recent[0]) is None
    assert alloc.lookup(busy[0]) == blocks["busy"][0] and alloc.refs(blocks["busy"][0]) == 2
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)  # only the busy block is left, and it is in use


def test_prompts_name_their_blocks_by_everything_before_them():
    a = prefix.extend([], list(range(40)), BS, 10)
    b = prefix.extend([], [*range(16), *range(100, 124)], BS, 10)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    moved = prefix.extend([], [*range(1, 17), *range(16, 32)], BS, 10)
    assert moved[1] != a[1]  # the same tokens after a different first block: another name
    assert prefix.shareable_blocks(32, BS) == 1 and prefix.shareable_blocks(33, BS) == 2  # the last token computes


# --- the engine ---------------------------------------------------------------------------------

SHARED = [(7 * i) % 300 + 5 for i in range(40)]  # 2 full blocks and 8 tokens


def _request(rid: int, ids: list[int], max_new: int = 6, prefill_logprobs: bool = False, **params) -> pb.Request:
    return shard_request(rid, ids, max_new, prefill_logprobs, **params)


@pytest.fixture(scope="module")
def parts(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return tokenizer, GrammarCompiler(tokenizer)


class Served:
    """An engine run request group by request group, recording what the router would see."""

    def __init__(self, model_dir, parts, caching: bool, chunk: int = 256, kv_bytes: int | None = None) -> None:
        self.runner = load_runner(
            model_dir, dtype="float32", device="cpu", prefix_caching=caching, kv_cache_bytes=kv_bytes
        )
        self.engine = Engine(self.runner, *parts, prefill_chunk=chunk)
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.cached: dict[int, int] = {}
        self.prefill: dict[int, list[float]] = {}
        self.batch_ids = iter(range(1000))
        self.computed = 0  # prompt and decode tokens the forwards ran
        step = self.runner.step

        def counted(seqs, want_prompt_logits=False, num_new=None):
            self.computed += sum(num_new) if num_new else sum(len(s.token_ids) - s.num_cached for s in seqs)
            return step(seqs, want_prompt_logits, num_new)

        self.runner.step = counted

    def _record(self, reply) -> pb.CachedBatch | None:
        for g in reply.generations:
            if g.request_id not in self.tokens:
                self.cached[g.request_id] = g.cached_tokens
            self.tokens.setdefault(g.request_id, []).extend(g.tokens.ids)
            self.logprobs.setdefault(g.request_id, []).extend(g.tokens.logprobs)
            if g.HasField("prefill_tokens"):
                self.prefill[g.request_id] = list(g.prefill_tokens.logprobs)[1:]
        return reply.batch if reply.HasField("batch") else None

    def start(self, *requests: pb.Request, beside: pb.CachedBatch | None = None) -> pb.CachedBatch | None:
        call = pb.PrefillRequest(batch=pb.Batch(id=next(self.batch_ids), requests=requests, size=len(requests)))
        if beside is not None:
            call.cached_batch.CopyFrom(beside)
        return self._record(self.engine.prefill(call))

    def decode(self, cached: pb.CachedBatch | None, steps: int | None = None) -> pb.CachedBatch | None:
        while cached is not None and (steps is None or steps > 0):
            cached = self._record(self.engine.decode(pb.DecodeRequest(batches=[cached])))
            steps = None if steps is None else steps - 1
        return cached

    def run(self, *requests: pb.Request) -> None:
        self.decode(self.start(*requests))

    @property
    def allocator(self) -> BlockAllocator:
        return self.runner.cache.allocator


def _workload(served: Served) -> None:
    """A first prompt; then two that share its beginning in one batch (greedy and seeded), beside a third
    with another beginning; then a block-aligned one asking for prompt logprobs."""
    served.run(_request(1, SHARED))
    served.run(
        _request(2, SHARED + [11, 12, 13]),
        _request(3, SHARED[:35] + [21, 22], do_sample=True, seed=7, temperature=0.9, top_k=50),
        _request(4, [9] * 20),
    )
    served.run(_request(5, SHARED[:32] + [31] * 16, prefill_logprobs=True))
    served.run(_request(6, SHARED[:32] + [31] * 16))  # aligned: 3 full blocks, the last recomputed


def test_same_tokens_with_caching_on_and_off_and_the_prefix_computed_once(tiny_llama_dir, parts):
    on, off = Served(tiny_llama_dir, parts, True), Served(tiny_llama_dir, parts, False)
    _workload(on)
    _workload(off)
    assert on.tokens == off.tokens
    for rid in on.tokens:
        assert on.logprobs[rid] == pytest.approx(off.logprobs[rid], abs=1e-4), rid
    assert on.cached == {1: 0, 2: 32, 3: 32, 4: 0, 5: 0, 6: 32}
    assert set(off.cached.values()) == {0}
    # Prompt logprobs: every prompt token's, as without caching (the request takes nothing cached).
    assert len(on.prefill[5]) == 47 and on.prefill[5] == pytest.approx(off.prefill[5], abs=1e-4)
    assert off.computed - on.computed == 32 * 3
    # Everything finished: every block is free or idle and cached, none in use.
    alloc = on.allocator
    assert alloc.num_free == on.runner.cache.num_blocks and alloc.num_cached > 0
    assert all(alloc.refs(b) == 0 for b in range(alloc.num_blocks))


def test_concurrent_prompts_with_one_beginning_store_and_compute_it_once(tiny_llama_dir, parts):
    """Four prompts sharing 64 tokens arrive together: the first computes the shared blocks while the
    others wait a step, then all four hold the same blocks; with chunks of 24 tokens too."""
    for chunk in (256, 24):
        on, off = Served(tiny_llama_dir, parts, True, chunk), Served(tiny_llama_dir, parts, False, chunk)
        common = [(5 * i) % 200 + 3 for i in range(64)]
        reqs = [_request(10 + k, common + [40 + k] * (k + 1), max_new=12) for k in range(4)]
        cached = {}
        for served in (on, off):
            batch = served.start(*reqs)
            while any(r.id not in served.tokens for r in reqs):
                batch = served.decode(batch, steps=1)
            cached[served is on] = batch
            held = [r.seq.blocks for r in served.engine.batches[batch.id].requests]
            if served is on:
                assert all(h[:4] == held[0][:4] for h in held), (chunk, held)
                in_use = {b for h in held for b in h}
                assert len(in_use) == 4 + 4  # the shared four blocks once, a last block each
            else:
                assert len({b for h in held for b in h[:4]}) == 16
            served.decode(batch)
        assert on.tokens == off.tokens, chunk
        assert sorted(on.cached.values()) == [0, 64, 64, 64], chunk
        assert off.computed - on.computed == 64 * 3, chunk


def test_eviction_under_pressure_keeps_running_requests_blocks(tiny_llama_dir, parts):
    """A cache of 12 blocks: finished prompts leave idle blocks, a running request holds shared ones, and
    newcomers need room: only idle blocks are evicted, and every answer is as without caching."""
    per_block = load_runner(tiny_llama_dir, dtype="float32", device="cpu")._bytes_per_block()
    results = []
    for caching in (True, False):
        served = Served(tiny_llama_dir, parts, caching, kv_bytes=12 * per_block)
        assert served.runner.cache.num_blocks == 12
        served.run(_request(1, SHARED))  # 3 blocks, then idle
        served.run(_request(2, [3] * 60))  # 4 more idle
        running = served.start(_request(3, SHARED + [8, 9], max_new=30))  # reuses 2 idle blocks
        running = served.decode(running, steps=2)
        holder = served.engine.batches[running.id].requests[0].seq
        held = list(holder.blocks)
        # A newcomer of 90 tokens needs 6 blocks: only 12 - 3 held are free or idle, so idle ones go.
        running = served.start(_request(4, [4] * 90, max_new=2), beside=running)
        assert all(served.allocator.refs(b) >= 1 for b in held)
        assert served.allocator.num_idle == (3 if caching else 0)  # one of request 2's idle blocks went
        assert holder.blocks[: len(held)] == held
        served.decode(running)
        results.append(served)
    on, off = results
    assert on.tokens == off.tokens
    assert on.cached[3] == 32 and on.cached[4] == 0


def test_the_router_budgets_held_prefix_blocks_once():
    class Req:
        def __init__(self, ids: list[int], new: int) -> None:
            self.input_ids, self.input_length, self.budget = ids, len(ids), len(ids) + new

    def entry(ids: list[int]) -> Entry:
        e = Entry.__new__(Entry)
        e.request, e.cancelled = Req(ids, 10), False
        e.prefix_names = prefix.extend([], ids, BS, prefix.shareable_blocks(len(ids), BS))
        return e

    common = list(range(64))
    a, b, c = entry(common + [1]), entry(common + [2]), entry(list(range(500, 565)))
    q = Queue()
    for e in (a, b, c):
        q.append(e)
    # Without the held blocks each costs 75 tokens; a and b share 64 of them, c shares nothing.
    assert q.next_batch(None, None, 1000, token_budget=75 + 11, block_size=BS) == [a, b]
    q.entries.extendleft([b, a])
    held = set(a.prefix_names)
    assert q.next_batch(None, None, prefill_budget=3, token_budget=1000, held=held, block_size=BS) == [a, b]
    assert q.next_batch(None, None, 1000, token_budget=74, held=held, block_size=BS) == []  # c brings its own
