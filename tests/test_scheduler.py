"""The batching policy without a shard: the Scheduler on its own, and the Batcher over a fake client.

The Scheduler decides every shard call (onboarding rules, budgets, pruning); the Batcher only
makes the calls. Each test drives one rule and checks the call it leads to.
"""

from __future__ import annotations

import asyncio

import pytest

from ember.proto import generate_pb2 as pb
from ember.router.batcher import Batcher
from ember.router.client import ShardedClient
from ember.router.errors import GenerationError
from ember.router.limits import Limits
from ember.router.metrics import Metrics
from ember.router.queue import Entry
from ember.router.scheduler import Filter, Forward, Scheduler
from ember.router.validation import ValidRequest


def _entry(n_input: int = 4, n_new: int = 4) -> Entry:
    return Entry(
        ValidRequest(
            inputs="x",
            input_ids=[1] * n_input,
            max_new_tokens=n_new,
            parameters=pb.NextTokenChooserParameters(),
            stopping=pb.StoppingCriteriaParameters(max_new_tokens=n_new),
            top_n_tokens=0,
            decoder_input_details=False,
            details=False,
            return_full_text=False,
            seed=0,
            best_of=1,
        )
    )


def _scheduler(shared: bool = False, **limits) -> Scheduler:
    lim = Limits(**{"max_batch_prefill_tokens": 4096, "max_batch_total_tokens": 16384, **limits})
    return Scheduler(lim, Metrics(lim.max_input_tokens, lim.max_total_tokens), shared_prefill=shared)


def _gen(entry: Entry, done: bool = False) -> pb.Generation:
    gen = pb.Generation(request_id=entry.id, tokens=pb.Tokens(ids=[7]))
    if done:
        gen.generated_text.CopyFrom(pb.GeneratedText(text="", generated_tokens=1))
    return gen


def _cached(batch_id: int, entries: list[Entry]) -> pb.CachedBatch:
    return pb.CachedBatch(id=batch_id, request_ids=[e.id for e in entries], size=len(entries))


def _run(s: Scheduler, *entries: Entry) -> pb.CachedBatch:
    """Prefill `entries` as the first batch; the shard keeps them all."""
    for e in entries:
        s.add(e)
    step = s.schedule()
    assert isinstance(step, Forward) and step.method == "prefill" and step.entries == list(entries)
    batch = _cached(step.batch.id, list(entries))
    s.update(step, [_gen(e) for e in entries], batch)
    return batch


def _ids(entries) -> list[int]:
    return [e.id for e in entries]


# ---- onboarding -----------------------------------------------------------------------------------


def test_the_first_batch_takes_what_fits_and_builds_the_shards_batch():
    s = _scheduler()
    a, b = _entry(4, 4), _entry(5, 3)
    s.add(a), s.add(b)
    step = s.schedule()
    assert step.method == "prefill" and step.cached == [] and step.entries == [a, b]
    assert [r.id for r in step.batch.requests] == [a.id, b.id]
    assert (step.batch.size, step.batch.max_tokens) == (2, 16)
    assert s.running == {a.id: a, b.id: b} and not s.queue and a.batched_at is not None
    assert s.metrics.batch_next_size.count() == 1


def test_nothing_to_do_is_none():
    assert _scheduler().schedule() is None


def test_tgi_rule_newcomers_wait_for_the_ratio_then_prefill_alone_and_merge_in_the_next_decode():
    s = _scheduler(waiting_served_ratio=1.2, max_waiting_tokens=100)
    running = [_entry() for _ in range(4)]
    batch = _run(s, *running)
    late = [_entry() for _ in range(4)]
    for e in late[:3]:
        s.add(e)
    step = s.schedule()  # 3 waiting < int(4 * 1.2): the running batch decodes on
    assert step.method == "decode" and step.cached == [batch] and len(s.queue) == 3
    s.update(step, [_gen(e) for e in running], batch)
    s.add(late[3])
    step = s.schedule()  # 4 waiting: they are prefilled on their own, the running batch pauses
    assert step.method == "prefill" and step.cached == [] and step.entries == late
    added = _cached(step.batch.id, late)
    s.update(step, [_gen(e) for e in late], added)
    step = s.schedule()
    assert step.method == "decode" and step.cached == [batch, added]
    assert s.metrics.batch_concat.get("backpressure") == 1


def test_tgi_rule_a_newcomer_that_waited_max_waiting_tokens_steps_is_taken_alone():
    s = _scheduler(waiting_served_ratio=1.2, max_waiting_tokens=3)
    running = [_entry() for _ in range(4)]
    batch = _run(s, *running)
    newcomer = _entry()
    s.add(newcomer)
    methods = []
    for _ in range(3):
        step = s.schedule()
        methods.append(step.method)
        s.update(step, [_gen(e) for e in step.entries], batch if step.method == "decode" else _cached(9, [newcomer]))
    assert methods == ["decode", "decode", "prefill"]
    assert s.metrics.batch_concat.get("wait_exceeded") == 1 and newcomer.id in s.running


def test_shared_prefill_newcomers_join_at_the_next_step_in_the_running_batchs_prefill():
    s = _scheduler(shared=True, waiting_served_ratio=1.2, max_waiting_tokens=100)
    running = [_entry() for _ in range(4)]
    batch = _run(s, *running)
    newcomer = _entry()
    s.add(newcomer)  # one is enough: no ratio to wait for
    step = s.schedule()
    assert step.method == "prefill" and step.cached == [batch] and step.entries == [newcomer]
    merged = _cached(batch.id, running + [newcomer])
    s.update(step, [_gen(e) for e in running + [newcomer]], merged)
    step = s.schedule()
    assert step.method == "decode" and step.cached == [merged]
    assert s.metrics.batch_concat.get("chunking") == 1


# ---- budgets --------------------------------------------------------------------------------------


def test_the_token_budget_counts_what_the_running_entries_reserve():
    s = _scheduler(shared=True, max_batch_total_tokens=40)
    batch = _run(s, _entry(10, 10))  # reserves 20 of 40
    fits, too_big = _entry(10, 10), _entry(10, 11)
    s.add(too_big), s.add(fits)
    step = s.schedule()  # FIFO: the first waiting entry does not fit what is left
    assert step.method == "decode" and step.cached == [batch] and len(s.queue) == 2
    s.update(step, [], batch)
    s.queue.remove(too_big)
    step = s.schedule()
    assert step.method == "prefill" and step.entries == [fits] and s.reserved() == 40


def test_max_batch_size_counts_the_running_entries():
    s = _scheduler(shared=True, max_batch_size=3)
    batch = _run(s, _entry(), _entry())
    waiting = [_entry() for _ in range(3)]
    for e in waiting:
        s.add(e)
    step = s.schedule()
    assert step.entries == waiting[:1] and len(s.queue) == 2
    s.update(step, [], _cached(batch.id, list(s.running.values())))
    assert s.schedule().method == "decode"  # full


def test_max_batch_size_limits_the_first_batch():
    s = _scheduler(max_batch_size=2)
    for _ in range(3):
        s.add(_entry())
    assert len(s.schedule().entries) == 2


def test_prefill_step_tokens_spreads_a_burst_under_shared_prefill_only():
    burst = [_entry(60, 4) for _ in range(5)]
    shared = _scheduler(shared=True, prefill_step_tokens=128)
    batch = _run(shared, _entry())
    for e in burst:
        shared.add(e)
    step = shared.schedule()
    assert step.entries == burst[:2] and step.cached == [batch]
    tgi = _scheduler(prefill_step_tokens=128, max_waiting_tokens=1)
    _run(tgi, _entry())
    for e in burst:
        tgi.add(e)
    assert tgi.schedule().entries == burst  # TGI's path takes all that fit max_batch_prefill_tokens


def test_max_batch_prefill_tokens_bounds_one_prefill():
    s = _scheduler(max_batch_prefill_tokens=100)
    a, b = _entry(60, 4), _entry(60, 4)
    s.add(a), s.add(b)
    assert s.schedule().entries == [a] and list(s.queue.entries) == [b]


# ---- cancellation ---------------------------------------------------------------------------------


def test_a_waiting_entry_cancelled_leaves_the_queue_at_once_and_is_never_prefilled():
    s = _scheduler()
    a, b = _entry(), _entry()
    s.add(a), s.add(b)
    s.cancel(a)
    assert list(s.queue.entries) == [b] and s.metrics.request_failure.get("dropped") == 1
    assert s.metrics.queue_size.get() == 1
    assert s.schedule().entries == [b]
    s.cancel(a)  # twice: counted once
    assert s.metrics.request_failure.get("dropped") == 1


def test_a_running_entry_cancelled_is_filtered_out_before_the_next_step():
    s = _scheduler(shared=True)
    a, b, c = _entry(), _entry(), _entry()
    batch = _run(s, a, b, c)
    s.cancel(b)
    action = s.schedule()
    assert isinstance(action, Filter) and action.batch is batch and action.keep == [a.id, c.id]
    assert b.id not in s.running and s.metrics.request_failure.get("dropped") == 1
    survivors = _cached(batch.id, [a, c])
    s.filtered(action, survivors)
    step = s.schedule()
    assert step.method == "decode" and step.cached == [survivors]


def test_a_newcomer_never_shares_a_prefill_with_a_cancelled_request():
    s = _scheduler(shared=True)
    a, b = _entry(), _entry()
    batch = _run(s, a, b)
    s.cancel(a)
    newcomer = _entry()
    s.add(newcomer)
    action = s.schedule()
    assert isinstance(action, Filter) and action.keep == [b.id] and list(s.queue.entries) == [newcomer]
    survivors = _cached(batch.id, [b])
    s.filtered(action, survivors)
    step = s.schedule()
    assert step.method == "prefill" and step.cached == [survivors] and list(step.cached[0].request_ids) == [b.id]


def test_when_every_running_entry_is_cancelled_the_batch_is_cleared():
    s = _scheduler()
    a, b = _entry(), _entry()
    _run(s, a, b)
    s.cancel(a), s.cancel(b)
    action = s.schedule()
    assert isinstance(action, Filter) and action.keep == []
    s.filtered(action, None)
    assert s.cached == [] and s.running == {} and s.schedule() is None
    assert s.metrics.request_failure.get("dropped") == 2 and s.metrics.batch_current_size.get() == 0


def test_a_request_cancelled_during_the_step_that_finishes_it_gets_no_token():
    s = _scheduler()
    a, b = _entry(), _entry()
    batch = _run(s, a, b)
    step = s.schedule()
    s.cancel(a)  # while the Decode runs
    out = s.update(step, [_gen(a, done=True), _gen(b)], _cached(batch.id, [b]))
    assert [e for e, _ in out.tokens] == [b] and out.finished == [] and not out.lost
    assert not a.finished and a.id not in s.running and s.metrics.request_failure.get("dropped") == 1
    assert s.schedule().method == "decode"  # nothing to filter: the shard dropped it


# ---- finished requests, lost requests, failures ---------------------------------------------------


def test_finished_requests_leave_running_and_their_last_token_is_handed_over():
    s = _scheduler()
    a, b, c = _entry(), _entry(), _entry()
    batch = _run(s, a, b, c)
    step = s.schedule()
    out = s.update(step, [_gen(a), _gen(b, done=True), _gen(c)], _cached(batch.id, [a, c]))
    assert [e for e, _ in out.tokens] == [a, b, c] and out.finished == [b] and b.finished
    assert set(s.running) == {a.id, c.id} and s.reserved() == a.budget + c.budget
    assert s.schedule().method == "decode"  # the shard's batch holds exactly the survivors: no Filter
    step = s.schedule()
    out = s.update(step, [_gen(a, done=True), _gen(c, done=True)], None)
    assert out.finished == [a, c] and s.running == {} and s.cached == [] and s.schedule() is None


def test_a_request_the_shard_dropped_without_finishing_is_lost():
    s = _scheduler()
    a, b = _entry(), _entry()
    batch = _run(s, a, b)
    out = s.update(s.schedule(), [_gen(a)], _cached(batch.id, [a]))
    assert out.lost == [b] and set(s.running) == {a.id}


def test_a_failed_shared_prefill_fails_the_running_batch_and_the_newcomers():
    s = _scheduler(shared=True)
    a = _entry()
    _run(s, a)
    newcomer, other = _entry(), _entry()
    s.add(newcomer)
    step = s.schedule()
    s.add(other)
    assert set(_ids(s.abort(step.cached, step.entries))) == {a.id, newcomer.id}
    assert s.running == {} and s.cached == []
    assert s.schedule().entries == [other]  # the next batch starts afresh


def test_a_failed_tgi_prefill_fails_only_the_newcomers_and_the_running_batch_decodes():
    s = _scheduler(max_waiting_tokens=1)
    a = _entry()
    batch = _run(s, a)
    newcomer = _entry()
    s.add(newcomer)
    step = s.schedule()
    assert step.cached == [] and step.entries == [newcomer]
    assert s.abort(step.cached, step.entries) == [newcomer]
    step = s.schedule()
    assert step.method == "decode" and step.cached == [batch] and set(s.running) == {a.id}


def test_reset_forgets_everything_running():
    s = _scheduler()
    a = _entry()
    _run(s, a)
    waiting = _entry()
    s.add(waiting)
    assert s.reset() == [a] and s.running == {} and s.cached == [] and list(s.queue.entries) == [waiting]


# ---- the Batcher over a fake client ---------------------------------------------------------------


class FakeShard:
    """The calls the Batcher makes, over an in-memory shard: one token per request and call, each
    request finishing after its max_new_tokens. Records every call."""

    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}
        self.left: dict[int, int] = {}
        self.calls: list[tuple] = []
        self.fail_next_decode = False

    async def prefill(self, batch, cached_batch=None, on_sent=None, prompt_budget=0):
        self.calls.append(
            (
                "prefill",
                [r.id for r in batch.requests],
                None if cached_batch is None else list(cached_batch.request_ids),
            )
        )
        if on_sent is not None:
            on_sent()
        await asyncio.sleep(0)
        for r in batch.requests:
            self.left[r.id] = r.stopping_parameters.max_new_tokens
        ids = [] if cached_batch is None else list(self.batches.pop(cached_batch.id))
        return self._step(batch.id, ids + [r.id for r in batch.requests], pb.PrefillResponse())

    async def decode(self, batches, on_sent=None, prompt_budget=0):
        self.calls.append(("decode", [list(b.request_ids) for b in batches]))
        if on_sent is not None:
            on_sent()
        await asyncio.sleep(0)
        if self.fail_next_decode:
            self.fail_next_decode = False
            raise RuntimeError("device lost")
        ids = [i for b in batches for i in self.batches.pop(b.id)]
        return self._step(batches[0].id, ids, pb.DecodeResponse())

    def _step(self, batch_id, ids, reply):
        keep = []
        for rid in ids:
            self.left[rid] -= 1
            gen = reply.generations.add(request_id=rid, tokens=pb.Tokens(ids=[rid]))
            if self.left[rid] == 0:
                gen.generated_text.generated_tokens = 1
            else:
                keep.append(rid)
        if keep:
            self.batches[batch_id] = keep
            reply.batch.CopyFrom(pb.CachedBatch(id=batch_id, request_ids=keep, size=len(keep)))
        return reply

    async def filter_batch(self, batch_id, request_ids):
        self.calls.append(("filter", batch_id, list(request_ids)))
        await asyncio.sleep(0)
        assert set(request_ids) <= set(self.batches[batch_id])
        self.batches[batch_id] = list(request_ids)
        return pb.CachedBatch(id=batch_id, request_ids=request_ids, size=len(request_ids))

    async def clear_cache(self, batch_id=None):
        self.calls.append(("clear", batch_id))
        await asyncio.sleep(0)
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)


def _within(coro, seconds: float = 10):
    """Run a scenario; a batching loop that never settles fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, seconds))


async def _events(entry: Entry) -> list:
    events = [await entry.events.get()]
    while not isinstance(events[-1], Exception) and not events[-1].HasField("generated_text"):
        events.append(await entry.events.get())
    return events


def _batcher(shared: bool = False, **limits) -> tuple[Batcher, FakeShard]:
    shard = FakeShard()
    lim = Limits(**{"max_batch_prefill_tokens": 4096, "max_batch_total_tokens": 16384, **limits})
    return Batcher(shard, lim, Metrics(lim.max_input_tokens, lim.max_total_tokens), shared_prefill=shared), shard


def test_the_batcher_filters_exactly_the_survivors_out_of_the_shards_batch():
    async def scenario():
        batcher, shard = _batcher()
        batcher.start()
        a, b, c = _entry(4, 6), _entry(4, 2), _entry(4, 6)
        for e in (a, b, c):
            batcher.append(e)
        await a.events.get()  # prefilled
        batcher.cancel(c)
        events = await asyncio.gather(_events(a), _events(b))
        await batcher.stop()
        return batcher, shard, events, (a, b, c)

    batcher, shard, (events_a, events_b), (a, _, c) = _within(scenario())
    filters = [call for call in shard.calls if call[0] == "filter"]
    # b finished on its own (the shard dropped it); only c's cancellation needs a Filter, keeping a.
    assert filters == [("filter", filters[0][1], [a.id])]
    assert len(events_a) == 5 and len(events_b) == 2 and events_a[-1].HasField("generated_text")
    assert len(c.events) == 1  # its first token only: the Decode's was computed after it left
    assert batcher.scheduler.running == {} and shard.batches == {}
    assert batcher.metrics.request_failure.get("dropped") == 1


def test_the_batcher_onboards_under_shared_prefill_in_one_prefill_with_the_running_batch():
    async def scenario():
        batcher, shard = _batcher(shared=True)
        batcher.start()
        first = _entry(4, 5)
        batcher.append(first)
        await first.events.get()
        late = _entry(4, 2)
        batcher.append(late)
        events = await asyncio.gather(_events(first), _events(late))
        await batcher.stop()
        return shard.calls, first, late, events

    calls, first, late, (events_first, events_late) = _within(scenario())
    assert calls[0] == ("prefill", [first.id], None)
    shared = [c for c in calls if c[0] == "prefill" and c[2] is not None]
    assert shared == [("prefill", [late.id], [first.id])]
    assert len(events_first) == 4 and len(events_late) == 2


def test_tokens_are_handed_over_once_the_next_call_is_sent_and_the_last_when_none_follows():
    async def scenario():
        batcher, shard = _batcher()
        log = []
        entry = _entry(4, 3)
        send = entry.send
        entry.send = lambda item: (log.append("token"), send(item))
        decode = shard.decode

        async def logged_decode(batches, on_sent=None, prompt_budget=0):
            log.append("decode")
            return await decode(batches, on_sent, prompt_budget)

        shard.decode = logged_decode
        batcher.start()
        batcher.append(entry)
        events = await _events(entry)
        await batcher.stop()
        return log, events

    log, events = _within(scenario())
    assert len(events) == 3 and log == ["decode", "token", "decode", "token", "token"]


def test_a_failed_decode_fails_its_requests_after_their_tokens_and_clears_the_batch():
    async def scenario():
        batcher, shard = _batcher()
        batcher.start()
        a = _entry(4, 5)
        batcher.append(a)
        first = await a.events.get()
        shard.fail_next_decode = True
        events = await _events(a)
        await batcher.stop()
        return batcher, shard, first, events

    batcher, shard, first, events = _within(scenario())
    assert first.tokens.ids and isinstance(events[-1], GenerationError) and "device lost" in str(events[-1])
    assert ("clear", 0) in shard.calls and batcher.scheduler.running == {} and batcher.scheduler.cached == []


# ---- on_sent fires for the batcher's own calls only -----------------------------------------------


class _Stub:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __getattr__(self, method: str):
        def call(request, timeout=None):
            self.log.append(method)

            async def reply():
                return {
                    "Prefill": pb.PrefillResponse(),
                    "Decode": pb.DecodeResponse(),
                    "CompileGrammar": pb.CompileGrammarResponse(),
                }.get(method)

            return reply()

        return call


class _Rank:
    def __init__(self, log: list[str]) -> None:
        self.stub = _Stub(log)


@pytest.mark.parametrize("ranks", [1, 2])
def test_on_sent_runs_only_for_the_prefill_and_decode_it_was_given_to(ranks):
    async def scenario():
        log: list[str] = []
        client = ShardedClient([_Rank(log) for _ in range(ranks)])

        def sent():
            log.append("sent")

        await client.health()
        await client.compile_grammar("a+")
        await client.clear_cache(3)
        await client.prefill(pb.Batch(id=1), on_sent=sent)
        await client.decode([pb.CachedBatch(id=1)], on_sent=sent)
        await client.decode([pb.CachedBatch(id=1)])
        return log

    log = _within(scenario())
    assert log == [
        m
        for m in ["Health", "CompileGrammar", "ClearCache", "Prefill", "sent", "Decode", "sent", "Decode"]
        for _ in range(ranks if m != "sent" else 1)
    ]
