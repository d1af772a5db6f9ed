"""The streaming load of load.py, straight over gRPC to a running shard: no router, no HTTP.

    python benchmarks/grpc_load.py --uds /tmp/ember-server-0 --concurrency 1 8 32 \
        --requests 64 --max-new-tokens 64 [--warmup] [--json results.json]

`concurrency` workers submit requests back to back, as load.py's do, to a
small batching loop of our own that plays the router's part without HTTP,
validation or SSE, with the router's default rules: when the shard can
prefill beside a cached batch (Info `shared_prefill`, Ember's
paged shard), waiting requests join at every step, about
`prefill_step_tokens` of prompts a step (the first always), in one Prefill
that carries the running batch; otherwise (or with `PREFILL_CHUNKING=0`, as
the router) TGI's: prefill waiting requests when enough wait relative to the
running batch (`waiting_served_ratio`) or the oldest waited
`max_waiting_tokens` steps, then decode both batches together. Each
generation goes to its worker, which stamps its arrival. The
figures come from load.py's `summarize`, so `HTTP ITL - gRPC ITL` at the same
level is the router's cost per token (see router_overhead.py).

Requests force their length (`ignore_eos`), and arrival stamps count only
tokens a streaming client would see (not special, not empty), like the HTTP side.
`--warmup` sizes the shard's KV cache first; leave it off when a router is
attached to the shard (Warmup clears every cached batch, the router's too).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from load import Level, RequestResult, format_summary, run_async, summarize

from ember import settings
from ember.proto import generate_pb2 as pb
from ember.proto import generate_pb2_grpc as pb_grpc
from ember.router.limits import prefill_step_budget

# Far above the router's ids (which count from 0), so both can share one shard.
ID_BASE = 1 << 48
Encode = Callable[[str], list[int]]


# ---------------------------------------------------------------- the shards


class Shards:
    """Every rank's stub; model calls go to all of them (their collectives meet), rank 0 answers."""

    def __init__(self, channels: list[grpc.aio.Channel]) -> None:
        self.channels = channels
        self.stubs = [pb_grpc.TextGenerationServiceStub(c) for c in channels]

    @classmethod
    async def connect(cls, master_uds: str) -> Shards:
        master = grpc.aio.insecure_channel(f"unix://{master_uds}")
        reply = await pb_grpc.TextGenerationServiceStub(master).ServiceDiscovery(
            pb.ServiceDiscoveryRequest(), timeout=30
        )
        await master.close()
        urls = list(reply.urls) or [f"unix://{master_uds}"]
        return cls([grpc.aio.insecure_channel(u if u.startswith("unix:") else f"unix://{u}") for u in urls])

    async def call(self, method: str, request):
        replies = await asyncio.gather(*(getattr(s, method)(request) for s in self.stubs))
        return replies[0]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


# ---------------------------------------------------------------- the batching loop


@dataclass(eq=False)
class Submitted:
    """One request on its way: its proto and the queue its generations arrive on."""

    request: pb.Request
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.input_ids)


@dataclass
class Policy:
    """The router's onboarding rules and prefill budgets, with its defaults."""

    waiting_served_ratio: float = settings.default("waiting-served-ratio")
    max_waiting_tokens: int = settings.default("max-waiting-tokens")
    max_batch_prefill_tokens: int = 4096
    # Newcomers join the running batch at every step, in a Prefill carrying it (the router's rule when
    # the shard says `shared_prefill`), about `prefill_step_tokens` of prompts a step.
    shared_prefill: bool = False
    prefill_step_tokens: int = 256

    @classmethod
    async def of_shard(cls, shards: Shards) -> Policy:
        """The rules the router would pick for this shard (and PREFILL_CHUNKING, as the router reads it)."""
        info = await shards.call("Info", pb.InfoRequest())
        return cls(
            shared_prefill=info.shared_prefill and settings.value("prefill-chunking"),
            prefill_step_tokens=prefill_step_budget(info.prefill_chunk_tokens, cls.max_batch_prefill_tokens),
        )


class MiniBatcher:
    """Prefill waiting requests, decode the running batch with them merged in, route generations."""

    def __init__(self, shards: Shards, policy: Policy) -> None:
        self.shards = shards
        self.policy = policy
        self.waiting: list[Submitted] = []
        self.running: dict[int, Submitted] = {}
        self.wakeup = asyncio.Event()
        self.stopping = False
        self.batch_ids = itertools.count(ID_BASE)
        self.task: asyncio.Task | None = None
        self.prefill_calls = 0
        self.decode_calls = 0
        self.decode_s = 0.0  # Decode calls' wall time as this loop saw them
        self.forward_s = 0.0  # the shard's own forward time inside them

    def decode_step(self) -> dict:
        """Mean Decode call and forward per step, in ms: the shard's share of each token's time."""
        n = self.decode_calls
        return {
            "calls": n,
            "prefill_calls": self.prefill_calls,
            "call_mean_ms": self.decode_s / n * 1e3 if n else float("nan"),
            "forward_mean_ms": self.forward_s / n * 1e3 if n else float("nan"),
        }

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Let the step in flight finish (so the shard's cache stays known), then clear our batch."""
        self.stopping = True
        self.wakeup.set()
        if self.task is not None:
            await self.task

    def submit(self, item: Submitted) -> None:
        self.waiting.append(item)
        self.wakeup.set()

    async def _run(self) -> None:
        while not self.stopping:
            await self.wakeup.wait()
            self.wakeup.clear()
            cached = await self._prefill(self._take(None))
            await self._serve(cached)

    async def _serve(self, cached: pb.CachedBatch | None) -> None:
        waited = 1
        while cached is not None:
            if self.stopping:
                await self.shards.call("ClearCache", pb.ClearCacheRequest(id=cached.id))
                return
            batches = [cached]
            new = self._take(waited)
            if new and self.policy.shared_prefill:  # the newcomers' prompts and the running tokens
                cached = await self._prefill(new, running=cached)
                continue
            if new:
                waited = 1
                added = await self._prefill(new)
                if added is not None:
                    batches.append(added)
            started = time.perf_counter()
            reply = await self.shards.call("Decode", pb.DecodeRequest(batches=batches))
            self.decode_calls += 1
            self.decode_s += time.perf_counter() - started
            self.forward_s += reply.forward_ns / 1e9
            self._dispatch(reply.generations)
            cached = reply.batch if reply.HasField("batch") else None
            waited += 1

    def _take(self, waited: int | None) -> list[Submitted]:
        """Waiting requests to prefill now; `waited` is None when no batch runs."""
        if not self.waiting:
            return []
        p = self.policy
        if (
            not p.shared_prefill
            and waited is not None
            and waited < p.max_waiting_tokens
            and len(self.waiting) < int(len(self.running) * p.waiting_served_ratio)
        ):
            return []
        taken, tokens = [], 0
        while self.waiting and tokens + self.waiting[0].prompt_tokens <= p.max_batch_prefill_tokens:
            if p.shared_prefill and taken and tokens + self.waiting[0].prompt_tokens > p.prefill_step_tokens:
                break
            tokens += self.waiting[0].prompt_tokens
            taken.append(self.waiting.pop(0))
        return taken

    async def _prefill(self, items: list[Submitted], running: pb.CachedBatch | None = None) -> pb.CachedBatch | None:
        """Prefill `items` as a new batch; with `running`, in the same forward as its next tokens."""
        if not items:
            return running
        for item in items:
            self.running[item.request.id] = item
        max_tokens = sum(i.prompt_tokens + i.request.stopping_parameters.max_new_tokens for i in items)
        batch = pb.Batch(
            id=next(self.batch_ids), requests=[i.request for i in items], size=len(items), max_tokens=max_tokens
        )
        request = pb.PrefillRequest(batch=batch)
        if running is not None:
            request.cached_batch.CopyFrom(running)
        reply = await self.shards.call("Prefill", request)
        self.prefill_calls += 1
        self._dispatch(reply.generations)
        return reply.batch if reply.HasField("batch") else None

    def _dispatch(self, generations) -> None:
        for gen in generations:
            item = self.running.get(gen.request_id)
            if item is None:
                continue
            item.events.put_nowait(gen)
            if gen.HasField("generated_text"):
                del self.running[gen.request_id]


# ---------------------------------------------------------------- one level


def make_request(rid: int, input_ids: list[int], text: str, max_new_tokens: int) -> pb.Request:
    """Greedy, forced length: what the HTTP side asks with temperature 0 and ignore_eos."""
    return pb.Request(
        id=rid,
        inputs=text,
        input_ids=input_ids,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new_tokens, ignore_eos_token=True),
    )


def visible_tokens(gen: pb.Generation) -> int:
    """Tokens of this step a streaming client would receive as text."""
    t = gen.tokens
    return sum(
        1 for text, special in itertools.zip_longest(t.texts, t.is_special, fillvalue=False) if text and not special
    )


async def stream_request(batcher: MiniBatcher, request: pb.Request, result: RequestResult) -> None:
    """Submit one request and fold its generations into `result` as they arrive."""
    started = time.perf_counter()
    item = Submitted(request)
    batcher.submit(item)
    try:
        while True:
            gen = await item.events.get()
            n = visible_tokens(gen)
            if n:
                result.stamps.append(time.perf_counter() - started)
                result.tokens += n
            if gen.HasField("generated_text"):
                result.reported_tokens = gen.generated_text.generated_tokens
                result.completed = True
                return
    except asyncio.CancelledError:
        result.cancelled_at = time.perf_counter() - started
        raise


async def run_level(
    uds: str, level: Level, encode: Encode, policy: Policy | None = None, warmup: pb.WarmupRequest | None = None
) -> dict:
    """One level over gRPC, summarised as load.py summarises an HTTP level, plus `decode_step`."""
    shards = await Shards.connect(uds)
    if warmup is not None:
        await shards.call("Warmup", warmup)
    batcher = MiniBatcher(shards, policy or await Policy.of_shard(shards))
    batcher.start()
    results: list[RequestResult] = []
    ids = itertools.count(ID_BASE + level.first_index)
    next_index = 0
    prompts = level.prompts()  # as load.py's levels: built before the clock starts

    async def worker(deadline: float) -> None:
        nonlocal next_index
        while next_index < level.max_requests and time.perf_counter() < deadline:
            text, _ = prompts[next_index]
            next_index += 1
            input_ids = encode(text)
            result = RequestResult(prompt_tokens=len(input_ids))
            results.append(result)
            await stream_request(batcher, make_request(next(ids), input_ids, text, level.max_new_tokens), result)

    started = time.perf_counter()
    tasks = [asyncio.create_task(worker(started + level.time_limit_s)) for _ in range(level.concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=level.time_limit_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - started
    await batcher.stop()
    await shards.close()
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
    summary = summarize(results, level, elapsed)
    summary["decode_step"] = batcher.decode_step()
    return summary


# ---------------------------------------------------------------- CLI


def tokenizer_encode(tokenizer_json: Path) -> Encode:
    """The router's tokenization (special tokens added) from a tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    return lambda text: tok.encode(text, add_special_tokens=True).ids


def main() -> None:
    from prompts import prompt_set

    from ember.store import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uds", default="/tmp/ember-server-0", help="the master shard's socket")
    p.add_argument("--model-id", default="smollm2", help="whose tokenizer measures and encodes the prompts")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=300)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--scenario", choices=["short", "long", "mix"], default="short")
    p.add_argument("--warmup", action="store_true", help="call Warmup first (only when no router is attached)")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    tokenizer = resolve_model(args.model_id).path / "tokenizer.json"
    prompts, encode = prompt_set(args.scenario, tokenizer), tokenizer_encode(tokenizer)
    warmup = (
        pb.WarmupRequest(max_input_tokens=1024, max_prefill_tokens=4096, max_total_tokens=2048) if args.warmup else None
    )
    results, first = [], 0
    for concurrency in args.concurrency:
        level = Level(
            concurrency,
            max(args.requests, concurrency),
            args.time_limit,
            args.max_new_tokens,
            lambda i: (prompts.text(i), prompts.tokens(i)),
            first,
        )
        first += level.max_requests
        summary = run_async(run_level(args.uds, level, encode, warmup=warmup))
        warmup = None
        results.append(summary)
        print(format_summary(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
