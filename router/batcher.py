"""The batching task: one asyncio task drives prefill and decode on the shards.

DESIGN.md "Continuous batching": with no running batch it prefills the next
entries that fit; then it loops Decode. Between steps it takes waiting
entries and onboards them in one of two ways:

* the shard can prefill beside a cached batch (Info `prefill_with_cached_batch`,
  Ember's paged model code; TGI v3 does the same for its chunking models):
  any waiting entries that fit are taken at every step, and one Prefill
  carries both the new batch and the running one, so the new prompts and the
  running requests' next tokens share one forward. Nobody waits for a ratio
  and running requests never pause for someone else's prefill. A step takes
  on about `prefill_step_tokens` of prompts (at least one newcomer), so a
  burst of arrivals is spread over a few steps: the first get their first
  token sooner, and running streams pause less. `PREFILL_CHUNKING=0` turns
  this off, as in TGI.
* otherwise TGI's rule for non-chunking models: take them when enough wait
  relative to the running batch (`waiting_served_ratio`) or the oldest has
  waited `max_waiting_tokens` steps, prefill them as a new batch (the running
  one pauses), and pass both batches to the next Decode, which merges them.

Finished and cancelled requests are filtered out after every step so their KV
blocks return at once. Generations are handed to each request's own channel;
nothing else happens per token here. They are handed over only once the next
shard call has been sent (`ShardedClient.on_sent`): each hand-over wakes the
request's task, which writes an SSE frame, and asyncio runs tasks in the order
they were woken, so handing over first would start the shard's next step only
after every stream's write (about a millisecond at 32 streams on this CPU).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import grpc

from ember.proto import generate_pb2 as pb
from ember.router.client import ShardedClient
from ember.router.errors import GenerationError
from ember.router.limits import Limits
from ember.router.metrics import Metrics
from ember.router.queue import Entry, Queue

log = logging.getLogger("ember.router.batcher")


def _rpc_message(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.details() or exc.code().name
    return str(exc) or type(exc).__name__


class Batcher:
    def __init__(self, client: ShardedClient, limits: Limits, metrics: Metrics,
                 prefill_with_running: bool = False) -> None:
        self.client = client
        self.prefill_with_running = prefill_with_running
        self.limits = limits
        self.metrics = metrics
        self.queue = Queue()
        self.running: dict[int, Entry] = {}
        self.wakeup = asyncio.Event()
        self.batch_ids = itertools.count()
        self.healthy = True
        self.task: asyncio.Task | None = None
        # Generations of the last shard call, not yet handed to their requests (see _deliver).
        self.undelivered: list[tuple[Entry, pb.Generation]] = []
        client.on_sent = self._deliver

    # -- entry points used by Infer ------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="ember-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def append(self, entry: Entry) -> None:
        self.queue.append(entry)
        self.metrics.queue_size.set(len(self.queue))
        self.wakeup.set()

    def cancel(self, entry: Entry) -> None:
        """The client went away: leave the queue now, or the batch at the next step."""
        if entry.finished or entry.cancelled:
            return
        entry.cancelled = True
        if self.queue.remove(entry):
            self.metrics.queue_size.set(len(self.queue))
            self.metrics.request_failure.inc("dropped")

    # -- the task ---------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            try:
                await self._drain()
                self._deliver()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the batching task die
                log.exception("batching task error")
                lost = list(self.running.values())
                await self._clear_all()  # first: a client told of the failure may retry at once
                self._fail(lost, "internal error in the batching task")

    async def _clear_all(self) -> None:
        """Nothing runs any more: drop every cached batch on the shards so their KV blocks return."""
        try:
            await self.client.clear_cache()
        except Exception as exc:
            log.error("ClearCache failed: %s", _rpc_message(exc))

    async def _drain(self) -> None:
        lim = self.limits
        while True:
            entries = self.queue.next_batch(None, lim.max_batch_size, lim.max_batch_prefill_tokens,
                                            lim.max_batch_total_tokens - self._reserved(), self._step_prefill())
            self.metrics.queue_size.set(len(self.queue))
            if not entries:
                return
            cached = await self._prefill(entries)
            await self._serve(cached)

    async def _serve(self, cached: pb.CachedBatch | None) -> None:
        waiting_steps = 1
        while cached is not None:
            new = self._take_more(len(self.running), waiting_steps)
            if new:
                waiting_steps = 1
                cached = await self._prune(cached)
            if new and cached is not None and self.prefill_with_running:
                cached = await self._prefill(new, running=cached)
            else:
                batches = [cached] if cached is not None else []
                if new:
                    added = await self._prefill(new)
                    if added is not None:
                        batches.append(added)
                batches = [b for b in [await self._prune(b) for b in batches] if b is not None]
                if not batches:
                    self._fail_lost(None)
                    return
                cached = await self._decode(batches)
            cached = await self._prune(cached) if cached is not None else None
            self._fail_lost(cached)
            waiting_steps += 1
            self._update_gauges()
        self._fail_lost(None)

    def _fail_lost(self, cached: pb.CachedBatch | None) -> None:
        """Requests the shard no longer holds but never finished: fail them, never hang."""
        held = len(cached.request_ids) if cached is not None else 0
        if len(self.running) == held:
            return
        kept = set(cached.request_ids) if cached is not None else set()
        lost = [e for rid, e in self.running.items() if rid not in kept]
        if lost:
            log.error("%d request(s) missing from the shard's batch", len(lost))
            self._fail(lost, "the shard dropped the request")

    def _take_more(self, batch_size: int, waiting_steps: int) -> list[Entry]:
        """TGI's rule for onboarding waiting requests into a running batch."""
        if not self.queue.entries:
            return []
        lim = self.limits
        wait_exceeded = waiting_steps >= lim.max_waiting_tokens
        joins_running = self.prefill_with_running and batch_size > 0
        min_size = None if wait_exceeded or joins_running else int(batch_size * lim.waiting_served_ratio)
        max_size = None
        if lim.max_batch_size is not None:
            max_size = lim.max_batch_size - batch_size
            if max_size <= 0:
                return []
        token_budget = lim.max_batch_total_tokens - self._reserved()
        entries = self.queue.next_batch(min_size, max_size, lim.max_batch_prefill_tokens, token_budget,
                                        self._step_prefill())
        self.metrics.queue_size.set(len(self.queue))
        if entries:
            reason = "chunking" if joins_running else "wait_exceeded" if wait_exceeded else "backpressure"
            self.metrics.batch_concat.inc(reason)
        return entries

    def _step_prefill(self) -> int | None:
        """Shared prefills take prompts a step at a time (`prefill_step_tokens`); TGI's path takes all that fit."""
        return self.limits.prefill_step_tokens if self.prefill_with_running else None

    def _reserved(self) -> int:
        return sum(e.budget for e in self.running.values())

    # -- shard calls ------------------------------------------------------------------
    async def _prefill(self, entries: list[Entry], running: pb.CachedBatch | None = None) -> pb.CachedBatch | None:
        """Prefill `entries` as a new batch; with `running`, in the same forward as its next tokens."""
        now = time.monotonic()
        for e in entries:
            e.batched_at = now
            self.running[e.id] = e
        batch = pb.Batch(id=next(self.batch_ids), requests=[e.to_pb() for e in entries],
                         size=len(entries), max_tokens=sum(e.budget for e in entries))
        self.metrics.batch_next_size.observe(len(entries))
        self._update_gauges()
        try:
            reply = await self._timed("prefill", self.client.prefill(batch, running))
        except Exception as exc:
            if running is None:
                await self._shard_failed(entries, [batch.id], exc)
            else:
                involved = [self.running[i] for i in running.request_ids if i in self.running] + entries
                await self._shard_failed(involved, [running.id, batch.id], exc)
            return None
        if reply.HasField("concat_ns"):
            self.metrics.batch_concat_duration.observe(reply.concat_ns / 1e9, "prefill")
        self._dispatch(reply.generations)
        return await self._prune(reply.batch) if reply.HasField("batch") else None

    async def _decode(self, batches: list[pb.CachedBatch]) -> pb.CachedBatch | None:
        try:
            reply = await self._timed("decode", self.client.decode(batches))
        except Exception as exc:
            ids = [i for b in batches for i in b.request_ids]
            entries = [self.running[i] for i in ids if i in self.running]
            await self._shard_failed(entries, [b.id for b in batches], exc)
            return None
        if reply.HasField("concat_ns"):
            self.metrics.batch_concat_duration.observe(reply.concat_ns / 1e9, "decode")
        self._dispatch(reply.generations)
        return reply.batch if reply.HasField("batch") else None

    async def _timed(self, method: str, call):
        m = self.metrics
        m.batch_inference_count.inc(method)
        started = time.monotonic()
        try:
            reply = await call
        except Exception:
            m.batch_inference_failure.inc(method)
            raise
        m.batch_inference_duration.observe(time.monotonic() - started, method)
        m.batch_forward_duration.observe(reply.forward_ns / 1e9, method)
        m.batch_decode_duration.observe(reply.decode_ns / 1e9, method)
        m.batch_inference_success.inc(method)
        return reply

    def _dispatch(self, generations) -> None:
        running = self.running
        for gen in generations:
            entry = running.get(gen.request_id)
            if entry is None:
                continue
            done = gen.HasField("generated_text")
            if done:  # the shard has already dropped it from its batch
                del running[gen.request_id]
            if entry.cancelled:
                if done:
                    self.metrics.request_failure.inc("dropped")
                continue
            self.undelivered.append((entry, gen))
            if done:
                entry.finished = True

    def _deliver(self) -> None:
        """Hand the last call's generations to their requests: right after the next shard call is
        sent (ShardedClient.on_sent), when the batching task has nothing more to send, and before
        any failure is reported (so a request's tokens come before its error)."""
        pending = self.undelivered
        if pending:
            self.undelivered = []
            for entry, gen in pending:
                entry.send(gen)

    async def _prune(self, batch: pb.CachedBatch) -> pb.CachedBatch | None:
        """Filter finished and cancelled requests out of a cached batch."""
        running = self.running
        for rid in batch.request_ids:
            entry = running.get(rid)
            if entry is not None and entry.cancelled:
                del running[rid]
                self.metrics.request_failure.inc("dropped")
        keep = [rid for rid in batch.request_ids if rid in running]
        if len(keep) == len(batch.request_ids):
            return batch
        started = time.monotonic()
        try:
            if not keep:
                await self.client.clear_cache(batch.id)
                return None
            return await self.client.filter_batch(batch.id, keep)
        except Exception as exc:
            entries = [running[i] for i in keep]
            await self._shard_failed(entries, [batch.id], exc)
            return None
        finally:
            self.metrics.batch_filter_duration.observe(time.monotonic() - started, "filter")
            self._update_gauges()

    async def _shard_failed(self, entries: list[Entry], batch_ids: list[int], exc: BaseException) -> None:
        message = _rpc_message(exc)
        log.error("shard error: %s (failing %d requests)", message, len(entries))
        self.healthy = False
        self._fail(entries, message)
        for batch_id in batch_ids:
            try:
                await self.client.clear_cache(batch_id)
            except Exception as clear_exc:
                log.error("ClearCache(%d) failed: %s", batch_id, _rpc_message(clear_exc))

    def _fail(self, entries: list[Entry], message: str) -> None:
        self._deliver()
        for e in entries:
            self.running.pop(e.id, None)
            if not e.finished:
                e.finished = True
                e.send(GenerationError(message))
        self._update_gauges()

    def _update_gauges(self) -> None:
        m = self.metrics
        size = len(self.running)
        m.batch_current_size.set(size)
        m.batch_current_max_tokens.set(self._reserved())
        if size > m.batch_peak_size.get():
            m.batch_peak_size.set(size)
