"""The batching policy as a plain object: which shard call comes next, and what its reply means.

No I/O and no asyncio: the batching task (batcher.py) asks `schedule()` for the next action,
makes that call, and reports back with `update()` (a Prefill/Decode reply), `filtered()` (a
FilterBatch/ClearCache reply) or `abort()` (a failed call). The scheduler owns the waiting
queue, the running entries (`running`, by request id) and the batches the shards hold for them
(`cached`: one, or two between TGI's newcomer Prefill and the Decode that merges them).

Actions, in the order `schedule()` considers them:

* `Filter`: a held batch carries requests that no longer run (cancelled ones: the shard drops
  finished ones itself); filter it down to the survivors (none left: clear it) before anything
  else, so their KV blocks return at once. This is the only place requests are pruned.
* `Forward` Prefill of new entries: with nothing held, the next entries that fit; with a
  running batch, the newcomers the onboarding rule admits (see `_take_more`), either in the same
  Prefill as the running batch (`shared_prefill`) or on their own, followed by a Decode of both.
* `Forward` Decode of the held batches.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from ember import prefix
from ember.proto import generate_pb2 as pb
from ember.router.limits import Limits
from ember.router.metrics import Metrics
from ember.router.queue import Entry, Queue


@dataclass(slots=True)
class Filter:
    """Keep only `keep` of `batch` on the shards (FilterBatch; ClearCache when `keep` is empty)."""

    batch: pb.CachedBatch
    keep: list[int]


@dataclass(slots=True)
class Forward:
    """One model call. Prefill: `batch` (of `entries`), beside `cached` under shared prefill.
    Decode (`batch` is None): the `cached` batches, merged by the shard into one.

    A Forward carries either none of the held batches (TGI's own Prefill of newcomers) or all of them."""

    cached: list[pb.CachedBatch]
    batch: pb.Batch | None = None
    entries: list[Entry] = field(default_factory=list)

    @property
    def method(self) -> str:
        return "decode" if self.batch is None else "prefill"


@dataclass(slots=True)
class Outcome:
    """What a Prefill/Decode reply meant."""

    # Generations to hand to their requests (cancelled requests' are left out).
    tokens: list[tuple[Entry, pb.Generation]]
    # Entries whose last token this was; they have left `running` (the shard has dropped them).
    # A cancelled request the step finished is in neither list: it is counted as dropped.
    finished: list[Entry]
    # Running entries the shard no longer holds though they never finished; they have left `running`.
    lost: list[Entry]


class Scheduler:
    def __init__(self, limits: Limits, metrics: Metrics, shared_prefill: bool = False, prefix_block: int = 0) -> None:
        self.limits = limits
        self.metrics = metrics
        self.shared_prefill = shared_prefill
        # The shard's KV block size when it caches prefixes (0: it does not): requests whose prompts
        # begin with the same blocks hold them once on the shard, and are budgeted so (`reserved`).
        self.prefix_block = prefix_block
        self.queue = Queue()
        self.running: dict[int, Entry] = {}
        self.cached: list[pb.CachedBatch] = []
        self.batch_ids = itertools.count()
        # Steps since newcomers last joined the running batch (TGI's `max_waiting_tokens` counts these).
        self.waiting_steps = 1
        # TGI's path: newcomers were just prefilled on their own; the next call is the Decode merging them.
        self.merge_next = False

    # -- requests coming and going ----------------------------------------------------------
    def add(self, entry: Entry) -> None:
        bs, request = self.prefix_block, entry.request
        if bs and not request.decoder_input_details:
            ids = request.input_ids
            entry.prefix_names = prefix.extend([], ids, bs, prefix.shareable_blocks(len(ids), bs))
        self.queue.append(entry)
        self.metrics.queue_size.set(len(self.queue))

    def cancel(self, entry: Entry) -> None:
        """The client went away: leave the queue now, or the batch at the next `schedule()`."""
        if entry.finished or entry.cancelled:
            return
        entry.cancelled = True
        if self.queue.remove(entry):
            self.metrics.queue_size.set(len(self.queue))
            self.metrics.request_failure.inc("dropped")

    # -- deciding ---------------------------------------------------------------------------
    def schedule(self) -> Filter | Forward | None:
        """The next shard call; None when nothing runs and nothing waiting fits."""
        for batch in self.cached:
            prune = self._prune(batch)
            if prune is not None:
                return prune
        if not self.cached:
            self.merge_next = False
            lim = self.limits
            reserved, held = self._reservation()
            entries = self.queue.next_batch(
                None,
                lim.max_batch_size,
                lim.max_batch_prefill_tokens,
                lim.max_batch_total_tokens - reserved,
                self._step_prefill(),
                held,
                self.prefix_block,
            )
            self.metrics.queue_size.set(len(self.queue))
            if not entries:
                return None
            self.waiting_steps = 1
            return self._prefill(entries, [])
        if self.merge_next:
            self.merge_next = False
            return Forward(list(self.cached))
        new = self._take_more(len(self.running), self.waiting_steps)
        self.waiting_steps = (1 if new else self.waiting_steps) + 1
        if not new:
            return Forward(list(self.cached))
        if self.shared_prefill and len(self.cached) == 1:
            return self._prefill(new, list(self.cached))
        self.merge_next = True
        return self._prefill(new, [])

    def _prune(self, batch: pb.CachedBatch) -> Filter | None:
        """The Filter `batch` needs, if any: cancelled requests leave `running` here."""
        running = self.running
        ids = batch.request_ids
        for rid in ids:
            entry = running.get(rid)
            if entry is not None and entry.cancelled:
                del running[rid]
                self.metrics.request_failure.inc("dropped")
        keep = [rid for rid in ids if rid in running]
        if len(keep) == len(ids):
            return None
        return Filter(batch, keep)

    def _take_more(self, batch_size: int, waiting_steps: int) -> list[Entry]:
        """TGI's rule for onboarding waiting requests into a running batch; under shared prefill
        they join at every step, about `prefill_step_tokens` of prompts at a time."""
        if not self.queue.entries:
            return []
        lim = self.limits
        wait_exceeded = waiting_steps >= lim.max_waiting_tokens
        joins_running = self.shared_prefill and batch_size > 0
        min_size = None if wait_exceeded or joins_running else int(batch_size * lim.waiting_served_ratio)
        max_size = None
        if lim.max_batch_size is not None:
            max_size = lim.max_batch_size - batch_size
            if max_size <= 0:
                return []
        reserved, held = self._reservation()
        entries = self.queue.next_batch(
            min_size,
            max_size,
            lim.max_batch_prefill_tokens,
            lim.max_batch_total_tokens - reserved,
            self._step_prefill(),
            held,
            self.prefix_block,
        )
        self.metrics.queue_size.set(len(self.queue))
        if entries:
            reason = "chunking" if joins_running else "wait_exceeded" if wait_exceeded else "backpressure"
            self.metrics.batch_concat.inc(reason)
        return entries

    def _step_prefill(self) -> int | None:
        """Shared prefills take prompts a step at a time (`prefill_step_tokens`); TGI's path takes all that fit."""
        return self.limits.prefill_step_tokens if self.shared_prefill else None

    def _prefill(self, entries: list[Entry], cached: list[pb.CachedBatch]) -> Forward:
        now = time.monotonic()
        running = self.running
        for e in entries:
            e.batched_at = now
            running[e.id] = e
        batch = pb.Batch(
            id=next(self.batch_ids),
            requests=[e.to_pb() for e in entries],
            size=len(entries),
            max_tokens=sum(e.budget for e in entries),
        )
        self.metrics.batch_next_size.observe(len(entries))
        self.update_gauges()
        return Forward(cached, batch, entries)

    def reserved(self) -> int:
        """Tokens (input + max_new_tokens) the running entries may still occupy, prefix blocks they
        share counted once."""
        return self._reservation()[0]

    def _reservation(self) -> tuple[int, set[bytes]]:
        """`reserved()` and the names of the prefix blocks the running entries hold."""
        bs = self.prefix_block
        held: set[bytes] = set()
        total = 0
        for e in self.running.values():
            total += e.budget - bs * len(e.prefix_names)
            held.update(e.prefix_names)
        return total + bs * len(held), held

    # -- the shard's answers ----------------------------------------------------------------
    def update(self, step: Forward, generations, batch: pb.CachedBatch | None) -> Outcome:
        """A Prefill/Decode reply: its generations and the batch the shard now holds for the
        requests it carried (the finished ones already dropped), if any are left."""
        running = self.running
        tokens: list[tuple[Entry, pb.Generation]] = []
        finished: list[Entry] = []
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
            tokens.append((entry, gen))
            if done:
                entry.finished = True
                finished.append(entry)
        if step.cached:
            self.cached = []
        if batch is not None:
            self.cached.append(batch)
        lost = self._lost()
        self.update_gauges()
        return Outcome(tokens, finished, lost)

    def filtered(self, action: Filter, batch: pb.CachedBatch | None) -> None:
        """The shard applied `action`: it now holds `batch` (None: nothing) instead of `action.batch`."""
        held = self.cached = list(self.cached)  # in place: a Decode merges them in this order
        i = next(i for i, b in enumerate(held) if b is action.batch)
        if batch is None:
            del held[i]
        else:
            held[i] = batch
        self.update_gauges()

    def abort(self, batches: list[pb.CachedBatch], newcomers: list[Entry] = ()) -> list[Entry]:
        """A call about `batches` (and `newcomers`) failed: every request in them leaves; these are
        the entries to fail. The shards' copies of the batches are to be cleared."""
        running = self.running
        gone = set(map(id, batches))
        self.cached = [b for b in self.cached if id(b) not in gone]
        entries = [running.pop(rid) for b in batches for rid in b.request_ids if rid in running]
        entries += [running.pop(e.id) for e in newcomers if e.id in running]
        self.update_gauges()
        return entries

    def reset(self) -> list[Entry]:
        """Forget every running entry and held batch (the shards' caches are to be cleared); returns them."""
        entries = list(self.running.values())
        self.running.clear()
        self.cached = []
        self.merge_next = False
        self.update_gauges()
        return entries

    def _lost(self) -> list[Entry]:
        """Running entries in no held batch: the shard dropped them without finishing them."""
        running = self.running
        if len(running) == sum(len(b.request_ids) for b in self.cached):
            return []
        kept = {rid for b in self.cached for rid in b.request_ids}
        lost = [e for rid, e in running.items() if rid not in kept]
        for e in lost:
            del running[e.id]
        return lost

    def update_gauges(self) -> None:
        m = self.metrics
        size = len(self.running)
        m.batch_current_size.set(size)
        reserved = self.reserved()
        m.batch_current_max_tokens.set(reserved)
        m.kv_cache_usage.set(min(1.0, reserved / max(self.limits.max_batch_total_tokens, 1)))
        if size > m.batch_peak_size.get():
            m.batch_peak_size.set(size)
