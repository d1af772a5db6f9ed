"""Waiting requests and TGI's rule for taking the next batch out of them.

An `Entry` is one validated request on its way through the batcher: it owns
the channel its generations are delivered on. The queue is a FIFO
deque used only from the event loop; `next_batch` pops entries while they
fit the prefill budget (prompt tokens) and the token budget
(input + max_new_tokens each), skipping entries whose client went away.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ember.proto import generate_pb2 as pb
from ember.router.validation import ValidRequest

_ids = itertools.count()


class Channel:
    """One consumer's FIFO of generations: asyncio.Queue's put_nowait/get, minus its cost.

    Every streamed token passes through one, so it keeps only what a single
    reader needs: a deque and the reader's pending future (asyncio.Queue also
    looks up the running loop on every wait and keeps putter bookkeeping).
    """

    __slots__ = ("items", "waiter", "loop")

    def __init__(self) -> None:
        self.items: deque = deque()
        self.waiter: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self.items)

    def empty(self) -> bool:
        return not self.items

    def put_nowait(self, item: Any) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def get_nowait(self) -> Any:
        if not self.items:
            raise asyncio.QueueEmpty
        return self.items.popleft()

    async def get(self) -> Any:
        items = self.items
        while not items:
            loop = self.loop
            if loop is None:
                loop = self.loop = asyncio.get_running_loop()
            waiter = self.waiter = loop.create_future()
            try:
                await waiter
            finally:
                if self.waiter is waiter:
                    self.waiter = None
        return items.popleft()


@dataclass(eq=False)
class Entry:
    request: ValidRequest
    id: int = field(default_factory=lambda: next(_ids))
    # Generations (pb.Generation) and, on failure, one exception.
    events: Channel = field(default_factory=Channel)
    queued_at: float = field(default_factory=time.monotonic)
    batched_at: float | None = None
    cancelled: bool = False
    finished: bool = False
    # The client's x-request-id, for the log line.
    tag: str = ""
    # Names of the prompt's leading blocks the shard may share with other prompts (`ember.prefix`).
    prefix_names: list[bytes] = field(default_factory=list)
    # Its spans while tracing is on (`ember.router.tracing`); None otherwise.
    trace: Any = None

    @property
    def budget(self) -> int:
        return self.request.budget

    def to_pb(self) -> pb.Request:
        r = self.request
        return pb.Request(
            id=self.id,
            inputs=r.inputs,
            input_ids=r.input_ids,
            parameters=r.parameters,
            stopping_parameters=r.stopping,
            prefill_logprobs=r.decoder_input_details,
            top_n_tokens=r.top_n_tokens,
        )

    def send(self, item: Any) -> None:
        self.events.put_nowait(item)


class Queue:
    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entry: Entry) -> None:
        self.entries.append(entry)

    def remove(self, entry: Entry) -> bool:
        """Drop a cancelled entry at once, so queue gauges are right immediately."""
        try:
            self.entries.remove(entry)
        except ValueError:
            return False
        return True

    def next_batch(
        self,
        min_size: int | None,
        max_size: int | None,
        prefill_budget: int,
        token_budget: int,
        step_prefill: int | None = None,
        held: set[bytes] | frozenset[bytes] = frozenset(),
        block_size: int = 0,
    ) -> list[Entry]:
        """Entries that fit both budgets, in order; none when fewer than min_size fit.

        `step_prefill`: a softer prompt budget that stops taking entries once reached,
        except that the first entry is always taken (when it fits the others).
        `held`: names of prefix blocks of `block_size` tokens that running requests hold on the shard
        (prefix caching): an entry's blocks already held, or brought by an entry taken before it, cost
        neither prompt nor token budget, as the shard stores and computes each once.
        """
        taken: list[Entry] = []
        prefill = tokens = 0
        bringing: set[bytes] = set()
        while self.entries and (max_size is None or len(taken) < max_size):
            entry = self.entries[0]
            if entry.cancelled:
                self.entries.popleft()
                self.dropped += 1
                continue
            new = [n for n in entry.prefix_names if n not in held and n not in bringing]
            shared = block_size * (len(entry.prefix_names) - len(new))
            length, budget = entry.request.input_length - shared, entry.budget - shared
            if prefill + length > prefill_budget or tokens + budget > token_budget:
                break
            if step_prefill is not None and taken and prefill + length > step_prefill:
                break
            self.entries.popleft()
            prefill += length
            tokens += budget
            bringing.update(new)
            taken.append(entry)
        if min_size is not None and len(taken) < min_size:
            self.entries.extendleft(reversed(taken))
            return []
        return taken
