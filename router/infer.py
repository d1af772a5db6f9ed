"""Inference on behalf of one HTTP request: permits, submission, results.

`Infer` is what every API adapter calls: `acquire()` (the 429 rule, before
validation as in TGI), `validate()`, then `stream()` or `generate()`. The
per-token work is turning one proto Generation into a `StreamItem`; JSON is
the adapter's business. Leaving an iteration early (client gone) cancels
the request in the batcher.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from ember.proto import generate_pb2 as pb
from ember.router import tracing
from ember.router.batcher import Batcher
from ember.router.errors import EmberError, GenerationError, IncompleteGeneration, OverloadedError
from ember.router.limits import Limits
from ember.router.metrics import Metrics
from ember.router.queue import Entry
from ember.router.types import GenerateRequest
from ember.router.validation import Validator, ValidRequest

log = logging.getLogger("ember.router.infer")

FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS_TOKEN: "eos_token",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}


@dataclass(slots=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}


@dataclass(slots=True)
class End:
    text: str
    generated_tokens: int
    finish_reason: str
    seed: int | None


@dataclass(slots=True)
class StreamItem:
    index: int
    token: TokenInfo
    top_tokens: list[TokenInfo]
    end: End | None = None


@dataclass
class Timing:
    arrived: float
    validation: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    total: float = 0.0
    per_token: float = 0.0


@dataclass
class Result:
    request: ValidRequest
    text: str
    generated_tokens: int
    finish_reason: str
    seed: int | None
    tokens: list[TokenInfo]
    top_tokens: list[list[TokenInfo]]
    prefill: list[TokenInfo]
    timing: Timing
    cached_tokens: int = 0

    @property
    def mean_logprob(self) -> float:
        values = [t.logprob for t in self.tokens if t.logprob is not None]
        return sum(values) / len(values) if values else -math.inf


def _tokens(msg: pb.Tokens) -> list[TokenInfo]:
    return [
        TokenInfo(i, t, None if math.isnan(lp) else lp, s)
        for i, t, lp, s in zip(msg.ids, msg.texts, msg.logprobs, msg.is_special)
    ]


class Permit:
    """One slot of max_concurrent_requests; released exactly once."""

    def __init__(self, infer: Infer) -> None:
        self.infer = infer
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.infer.in_flight -= 1


@dataclass
class Stream:
    """A submitted request whose items are read with `items()`."""

    entry: Entry
    timing: Timing
    prefill: list[TokenInfo] = field(default_factory=list)
    # best_of runs several entries for one client request: only one is counted and logged.
    primary: bool = True
    # Prompt tokens the shard took from its prefix cache (known with the first token).
    cached_tokens: int = 0
    # When the latest tokens arrived (time.monotonic()): inter-token latency is measured from it.
    last_token_at: float = 0.0


class Infer:
    def __init__(self, validator: Validator, batcher: Batcher, limits: Limits, metrics: Metrics) -> None:
        self.validator = validator
        self.batcher = batcher
        self.limits = limits
        self.metrics = metrics
        self.in_flight = 0

    def acquire(self) -> Permit:
        """TGI's try_acquire: beyond max_concurrent_requests, 429 at once."""
        self.metrics.request_count.inc()
        if self.in_flight >= self.limits.max_concurrent_requests:
            self.metrics.request_failure.inc("overloaded")
            raise OverloadedError()
        self.in_flight += 1
        return Permit(self)

    async def embed(self, token_lists: list[list[int]]) -> list[list[float]]:
        """Pooled, normalised embeddings of token lists, under one permit (429 beyond the limit, as any
        request); a shard's failure is a GenerationError."""
        permit = self.acquire()
        try:
            reply = await self.batcher.client.embed(token_lists)
        except grpc.aio.AioRpcError as exc:
            raise GenerationError(exc.details() or str(exc.code())) from None
        finally:
            permit.release()
        return [list(e.values) for e in reply.embeddings]

    def count_failure(self, exc: EmberError) -> None:
        self.metrics.request_failure.inc(exc.metric_label)

    async def validate(self, request: GenerateRequest, stream: bool = False) -> ValidRequest:
        try:
            valid = await tracing.validation(self.validator.validate(request, stream))
        except EmberError as exc:
            self.count_failure(exc)
            raise
        self.metrics.validation_duration.observe(valid.validation_time)
        return valid

    def submit(self, valid: ValidRequest, arrived: float | None = None, tag: str = "") -> Stream:
        entry = Entry(valid, tag=tag)
        tracing.submitted(entry)
        self.batcher.append(entry)
        timing = Timing(arrived=arrived or entry.queued_at, validation=valid.validation_time)
        return Stream(entry, timing)

    async def items(self, stream: Stream) -> AsyncIterator[StreamItem]:
        """The request's tokens in order; the last one carries `end`. Raises on failure."""
        entry = stream.entry
        index = 0
        try:
            while True:
                event = await entry.events.get()
                if isinstance(event, Exception):
                    if isinstance(event, EmberError):
                        self.count_failure(event)
                    log.warning(
                        "Failed id=%s input_tokens=%d error=%s",
                        entry.tag or entry.id,
                        entry.request.input_length,
                        event,
                        extra={"fields": {"id": entry.tag or entry.id, "error": str(event)}},
                    )
                    tracing.failed(entry, event)
                    raise event
                if event.HasField("prefill_tokens"):
                    stream.prefill = _tokens(event.prefill_tokens)
                if stream.primary:
                    self._latencies(stream, event, index)
                if index == 0:
                    self._prompt_done(stream, event.cached_tokens)
                for item in self._expand(event, index, stream):
                    index += 1
                    yield item
                    if item.end is not None:
                        return
        finally:
            self.batcher.cancel(entry)
            tracing.closed(entry)

    def _latencies(self, stream: Stream, gen: pb.Generation, index: int) -> None:
        """Time to first token from arrival; then each token's share of the gap since the previous step's
        (a step that brings several tokens spreads its gap over them)."""
        now = time.monotonic()
        if index == 0:
            self.metrics.time_to_first_token.observe(now - stream.timing.arrived)
        else:
            n = len(gen.tokens.ids)
            gap = (now - stream.last_token_at) / max(n, 1)
            for _ in range(n):
                self.metrics.inter_token_latency.observe(gap)
        stream.last_token_at = now

    def _prompt_done(self, stream: Stream, cached: int) -> None:
        stream.cached_tokens = cached
        length = stream.entry.request.input_length
        self.metrics.prompt_tokens.inc("cached", amount=cached)
        self.metrics.prompt_tokens.inc("computed", amount=max(0, length - cached))

    def _expand(self, gen: pb.Generation, index: int, stream: Stream) -> list[StreamItem]:
        toks = gen.tokens
        ids = toks.ids
        n = len(ids)
        tops = gen.top_tokens
        if n == 1 and not tops:  # the common case: one token, no top tokens
            lps, texts, special = toks.logprobs, toks.texts, toks.is_special
            lp = lps[0] if lps else math.nan
            out = [
                StreamItem(
                    index + 1,
                    TokenInfo(
                        ids[0], texts[0] if texts else "", None if lp != lp else lp, special[0] if special else False
                    ),
                    [],
                )
            ]
        else:
            ids, texts, lps, special = list(ids), list(toks.texts), list(toks.logprobs), list(toks.is_special)
            out = []
            for i in range(n):
                lp = lps[i] if i < len(lps) else math.nan
                token = TokenInfo(
                    ids[i],
                    texts[i] if i < len(texts) else "",
                    None if math.isnan(lp) else lp,
                    special[i] if i < len(special) else False,
                )
                top = _tokens(tops[i]) if i < len(tops) else []
                out.append(StreamItem(index + i + 1, token, top))
        if out and gen.HasField("generated_text"):
            g = gen.generated_text
            out[-1].end = End(
                g.text,
                g.generated_tokens,
                FINISH_REASONS.get(g.finish_reason, "length"),
                g.seed if g.HasField("seed") else stream.entry.request.seed,
            )
            tracing.ended(stream, out[-1].end)
            if stream.primary:
                self._finished(stream, g.generated_tokens, out[-1].end)
        return out

    def _finished(self, stream: Stream, generated: int, end: End) -> None:
        entry, t = stream.entry, stream.timing
        now = time.monotonic()
        batched = entry.batched_at or entry.queued_at
        t.queue = batched - entry.queued_at
        t.inference = now - batched
        t.total = now - t.arrived
        t.per_token = t.inference / max(generated, 1)
        m = self.metrics
        m.request_success.inc()
        m.request_duration.observe(t.total)
        m.queue_duration.observe(t.queue)
        m.inference_duration.observe(t.inference)
        m.time_per_token.observe(t.per_token)
        m.input_length.observe(entry.request.input_length)
        m.generated_tokens.observe(generated)
        m.max_new_tokens.observe(entry.request.max_new_tokens)
        fields = {
            "id": entry.tag or entry.id,
            "input_tokens": entry.request.input_length,
            "generated_tokens": generated,
            "finish_reason": end.finish_reason,
            "seed": end.seed,
            "validation_time_ms": round(t.validation * 1e3, 3),
            "queue_time_ms": round(t.queue * 1e3, 3),
            "inference_time_ms": round(t.inference * 1e3, 3),
            "time_per_token_ms": round(t.per_token * 1e3, 3),
        }
        log.info("Success %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})

    async def collect(self, stream: Stream) -> Result:
        """Run a submitted request to its end and gather everything it produced."""
        tokens: list[TokenInfo] = []
        tops: list[list[TokenInfo]] = []
        async for item in self.items(stream):
            tokens.append(item.token)
            tops.append(item.top_tokens)
            if item.end is not None:
                e = item.end
                return Result(
                    stream.entry.request,
                    e.text,
                    e.generated_tokens,
                    e.finish_reason,
                    e.seed,
                    tokens,
                    tops,
                    stream.prefill,
                    stream.timing,
                    stream.cached_tokens,
                )
        exc = IncompleteGeneration()
        self.count_failure(exc)
        raise exc

    async def generate(self, valid: ValidRequest, arrived: float, tag: str = "") -> tuple[Result, list[Result]]:
        """One request, or best_of sampled ones: the best (highest mean logprob) and all."""
        if valid.best_of <= 1:
            return await self.collect(self.submit(valid, arrived, tag)), []
        subs = [self.submit(_reseeded(valid), arrived, tag) for _ in range(valid.best_of)]
        for sub in subs[1:]:
            sub.primary = False
        tasks = [asyncio.ensure_future(self.collect(s)) for s in subs]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        best = max(results, key=lambda r: r.mean_logprob)
        return best, list(results)


def _reseeded(valid: ValidRequest) -> ValidRequest:
    """A copy with its own random seed (best_of requests must differ)."""
    params = type(valid.parameters)()
    params.CopyFrom(valid.parameters)
    params.seed = random.getrandbits(63)
    copy = ValidRequest(**{**valid.__dict__, "parameters": params, "seed": params.seed})
    return copy
