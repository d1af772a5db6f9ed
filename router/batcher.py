"""The batching task: one asyncio task drives prefill and decode on the shards.

DESIGN.md "Continuous batching". The policy lives in `Scheduler` (scheduler.py), a plain object
with no I/O: it owns the waiting queue and the running entries and decides every shard call.
This task only makes those calls, feeds the replies back, and hands generations to their
requests. With no running batch it prefills the next entries that fit; then it loops Decode.
Between steps it takes waiting entries and onboards them in one of two ways:

* shared prefill: the shard can prefill beside a cached batch (Info `prefill_with_cached_batch`,
  Ember's paged model code; TGI v3 does the same for its chunking models): any waiting entries
  that fit are taken at every step, and one Prefill carries both the new batch and the running
  one, so the new prompts and the running requests' next tokens share one forward. Nobody waits
  for a ratio and running requests never pause for someone else's prefill. A step takes on
  about `prefill_step_tokens` of prompts (at least one newcomer), so a burst of arrivals is
  spread over a few steps: the first get their first token sooner, and running streams pause
  less. `PREFILL_CHUNKING=0` turns this off, as in TGI.
* otherwise TGI's rule for non-chunking models: take them when enough wait
  relative to the running batch (`waiting_served_ratio`) or the oldest has
  waited `max_waiting_tokens` steps, prefill them as a new batch (the running
  one pauses), and pass both batches to the next Decode, which merges them.

Finished and cancelled requests are filtered out before the next step so their KV
blocks return at once. Generations are handed to each request's own channel;
nothing else happens per token here. They are handed over only once the next
Prefill/Decode has been sent (the client's `on_sent`): each hand-over wakes the
request's task, which writes an SSE frame, and asyncio runs tasks in the order
they were woken, so handing over first would start the shard's next step only
after every stream's write (about a millisecond at 32 streams on this CPU).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from ember.proto import generate_pb2 as pb
from ember.router import tracing
from ember.router.client import ShardedClient
from ember.router.errors import GenerationError
from ember.router.limits import Limits
from ember.router.metrics import Metrics
from ember.router.pacer import Pacer
from ember.router.queue import Entry
from ember.router.scheduler import Filter, Forward, Scheduler

log = logging.getLogger("ember.router.batcher")


def _rpc_message(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.details() or exc.code().name
    return str(exc) or type(exc).__name__


class Batcher:
    def __init__(
        self,
        client: ShardedClient,
        limits: Limits,
        metrics: Metrics,
        shared_prefill: bool = False,
        prefix_block: int = 0,
        pacer: Pacer | None = None,
    ) -> None:
        self.client = client
        self.pacer = pacer or Pacer(0)
        self.shared_prefill = shared_prefill
        self.limits = limits
        self.metrics = metrics
        self.scheduler = Scheduler(limits, metrics, shared_prefill, prefix_block)
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        # Generations of the last shard call, not yet handed to their requests (see _deliver).
        self.undelivered: list[tuple[Entry, pb.Generation]] = []

    # -- entry points used by Infer ------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="ember-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def append(self, entry: Entry) -> None:
        self.scheduler.add(entry)
        self.wakeup.set()

    def cancel(self, entry: Entry) -> None:
        """The client went away: leave the queue now, or the batch before the next step."""
        self.scheduler.cancel(entry)

    def fail_all(self, message: str) -> None:
        """The model is going away (unloaded, or its shards died): every queued and running request
        ends with `message`, after any tokens it is owed."""
        waiting = list(self.scheduler.queue.entries)
        self.scheduler.queue.entries.clear()
        self._fail(self.scheduler.reset() + waiting, message)

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
                lost = self.scheduler.reset()
                await self._clear_all()  # first: a client told of the failure may retry at once
                self._fail(lost, "internal error in the batching task")

    async def _clear_all(self) -> None:
        """Nothing runs any more: drop every cached batch on the shards so their KV blocks return."""
        try:
            await self.client.clear_cache()
        except Exception as exc:
            log.error("ClearCache failed: %s", _rpc_message(exc))

    async def _drain(self) -> None:
        """Make the scheduler's calls until nothing runs and nothing waiting fits."""
        schedule = self.scheduler.schedule
        while (action := schedule()) is not None:
            if type(action) is Forward:
                await tracing.step(self._forward(action), action, self.scheduler.running)
            else:
                await tracing.step(self._filter(action), action, self.scheduler.running)

    # -- shard calls ------------------------------------------------------------------
    async def _forward(self, step: Forward) -> None:
        """One Prefill or Decode; the tokens of the previous one are handed over once it is sent."""
        batch, cached = step.batch, step.cached
        budget = self.pacer.budget(sum(len(b.request_ids) for b in cached))
        try:
            if batch is None:
                method = "decode"
                reply = await self._timed(
                    method, self.client.decode(cached, on_sent=self._deliver, prompt_budget=budget)
                )
            else:
                method = "prefill"
                running = cached[0] if cached else None
                reply = await self._timed(
                    method, self.client.prefill(batch, running, on_sent=self._deliver, prompt_budget=budget)
                )
        except Exception as exc:
            ids = [b.id for b in cached] + ([batch.id] if batch is not None else [])
            await self._shard_failed(self.scheduler.abort(cached, step.entries), ids, exc)
            return
        if reply.HasField("concat_ns"):
            self.metrics.batch_concat_duration.observe(reply.concat_ns / 1e9, method)
        self.pacer.observe(reply.decode_rows, reply.prompt_tokens, reply.forward_ns)
        if reply.draft_tokens:
            self.metrics.draft_tokens.inc(amount=reply.draft_tokens)
            self.metrics.accepted_tokens.inc(amount=reply.accepted_tokens)
        out = self.scheduler.update(step, reply.generations, reply.batch if reply.HasField("batch") else None)
        if self.undelivered:
            self.undelivered += out.tokens
        else:
            self.undelivered = out.tokens
        if out.lost:
            log.error("%d request(s) missing from the shard's batch", len(out.lost))
            self._fail(out.lost, "the shard dropped the request")

    async def _filter(self, action: Filter) -> None:
        """Filter finished and cancelled requests out of a cached batch."""
        started = time.monotonic()
        try:
            if action.keep:
                batch = await self.client.filter_batch(action.batch.id, action.keep)
            else:
                await self.client.clear_cache(action.batch.id)
                batch = None
        except Exception as exc:
            await self._shard_failed(self.scheduler.abort([action.batch]), [action.batch.id], exc)
            return
        finally:
            self.metrics.batch_filter_duration.observe(time.monotonic() - started, "filter")
        self.scheduler.filtered(action, batch)

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

    def _deliver(self) -> None:
        """Hand the last call's generations to their requests: right after the next Prefill/Decode
        is sent (the client's `on_sent`), when the batching task has nothing more to send, and
        before any failure is reported (so a request's tokens come before its error)."""
        pending = self.undelivered
        if pending:
            self.undelivered = []
            for entry, gen in pending:
                entry.send(gen)

    async def _shard_failed(self, entries: list[Entry], batch_ids: list[int], exc: BaseException) -> None:
        message = _rpc_message(exc)
        tracing.step_failed(exc)
        log.error("shard error: %s (failing %d requests)", message, len(entries))
        self._fail(entries, message)
        for batch_id in batch_ids:
            try:
                await self.client.clear_cache(batch_id)
            except Exception as clear_exc:
                log.error("ClearCache(%d) failed: %s", batch_id, _rpc_message(clear_exc))

    def _fail(self, entries: list[Entry], message: str) -> None:
        """Tell `entries` (already out of the scheduler) of a failure, after any tokens they are owed."""
        self._deliver()
        for e in entries:
            if not e.finished:
                e.finished = True
                e.send(GenerationError(message))
