"""The router's spans (`--otlp-endpoint`; `ember.tracing` sets up the exporter and says why off is free).

Per HTTP generation request (`RequestSpans`, an ASGI middleware mounted only while tracing is on):
a root span named by the route as TGI names it (`generate`, `generate_stream`, `chat_completions`, ...,
continuing the caller's trace when the request carries a W3C `traceparent`), and under it
`validation` (tokenisation, grammar; the request's parameters and input tokens go on the root),
then per submitted sequence (best_of and `n` submit several) `queue` (waiting for admission) and
`inference` (from admission to the last token: output tokens, finish reason).

Per batching step (`step`, wrapping the batcher's call): one span, `prefill`, `decode`,
`filter_batch` or `clear_cache`, current while the call is made, so `ShardedClient` sends its
context to the shards (`ember.tracing.outgoing`). A step serves many requests: its span is a child
of the `inference` span of the oldest request in the step and carries a link to the `inference`
span of every other one; a request's `inference` span links back to the step that admitted it.
docs/architecture.md ("Tracing") says why.

Every hook returns at once when tracing is off, and none runs per token: the Infer hooks run once
per request, `step` once per shard call.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from ember import tracing as otel

if TYPE_CHECKING:
    from ember.router.infer import End, Stream
    from ember.router.queue import Entry
    from ember.router.validation import ValidRequest

T = TypeVar("T")

# The generation (and embedding) routes that get a root span, by path, named as TGI names its spans.
ROUTES = {
    "/generate": "generate",
    "/generate_stream": "generate_stream",
    "/": "compat_generate",
    "/invocations": "invocations",
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/api/generate": "ollama_generate",
    "/api/chat": "ollama_chat",
    "/api/embed": "ollama_embed",
    "/api/embeddings": "ollama_embeddings",
}

_GRAMMARS = {1: "json", 2: "regex"}


def enabled() -> bool:
    return otel.tracer is not None


# --- the HTTP request ------------------------------------------------------------------------------------------


class RequestSpans:
    """ASGI middleware: the root span of every POST to a route in ROUTES. It reads the response's start
    (its status) and never touches body messages (event streams send those past the middleware)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        name = ROUTES.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if name is None or otel.tracer is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind, Status, StatusCode

        carried = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k in _TRACE_HEADERS]
        attributes = {"http.request.method": "POST", "http.route": scope["path"]}
        request_id = scope.get("state", {}).get("request_id")
        if request_id:
            attributes["ember.request_id"] = request_id
        status: list[int] = []

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        with otel.tracer.start_as_current_span(
            name, context=otel.incoming(carried), kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                if status:
                    span.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        span.set_status(Status(StatusCode.ERROR, f"HTTP {status[0]}"))
                model = _model_name(scope)
                if model:
                    span.set_attribute("gen_ai.request.model", model)


_TRACE_HEADERS = (b"traceparent", b"tracestate")


def _model_name(scope: dict) -> str | None:
    """The model the request was served by: its lease (every route resolving a model takes one), else
    the app's default model."""
    from ember.router.models import LEASES

    leases = scope.get(LEASES)
    if leases:
        return leases[-1][1].name
    state = getattr(getattr(scope.get("app"), "state", None), "ember", None)
    return getattr(state, "model_id", None)


# --- Infer's hooks: once per request ----------------------------------------------------------------------------


def validation(call: Awaitable[ValidRequest]) -> Awaitable[ValidRequest]:
    """`call` (the validator's) under a `validation` span; the request's parameters go on the root span."""
    if otel.tracer is None:
        return call
    return _validation(call)


async def _validation(call: Awaitable[ValidRequest]) -> ValidRequest:
    from opentelemetry import trace

    root = trace.get_current_span()
    with otel.tracer.start_as_current_span("validation") as span:
        valid = await call
        span.set_attribute("gen_ai.usage.input_tokens", valid.input_length)
        root.set_attributes(request_attributes(valid))
        return valid


def request_attributes(valid: ValidRequest) -> dict[str, Any]:
    """The request as a span says it (OpenTelemetry's gen_ai names where they exist; never the text)."""
    p, stopping = valid.parameters, valid.stopping
    return {
        "gen_ai.usage.input_tokens": valid.input_length,
        "gen_ai.request.max_tokens": valid.max_new_tokens,
        "gen_ai.request.temperature": p.temperature,
        "gen_ai.request.top_p": p.top_p,
        "gen_ai.request.top_k": p.top_k,
        "gen_ai.request.seed": valid.seed,
        "gen_ai.request.frequency_penalty": p.frequency_penalty,
        "gen_ai.request.presence_penalty": p.presence_penalty,
        "ember.request.do_sample": p.do_sample,
        "ember.request.repetition_penalty": p.repetition_penalty,
        "ember.request.typical_p": p.typical_p,
        "ember.request.min_p": p.min_p,
        "ember.request.best_of": valid.best_of,
        "ember.request.top_n_tokens": valid.top_n_tokens,
        "ember.request.stop_sequences": len(stopping.stop_sequences),
        "ember.request.ignore_eos": stopping.ignore_eos_token,
        "ember.request.grammar": _GRAMMARS.get(p.grammar_type, "none"),
    }


class _EntryTrace:
    """One submitted sequence's spans: the request's root (`own_root`: made here, the request came by
    no traced route) and its `inference` span once admitted."""

    __slots__ = ("root", "own_root", "parent", "inference")

    def __init__(self, root: Any, own_root: bool, parent: Any) -> None:
        self.root = root
        self.own_root = own_root
        self.parent = parent
        self.inference: Any = None


def submitted(entry: Entry) -> None:
    """The entry's spans will be children of the current (root) span."""
    if otel.tracer is None:
        return
    from opentelemetry import trace

    root = trace.get_current_span()
    own_root = not root.get_span_context().is_valid
    if own_root:
        root = otel.tracer.start_span("request", start_time=otel.epoch_ns(entry.queued_at))
    entry.trace = _EntryTrace(root, own_root, trace.set_span_in_context(root))


def _admit(entry: Entry) -> None:
    """The entry joined a batch: its `queue` span is over and its `inference` span begins (both at
    `batched_at`, set by the scheduler)."""
    t = entry.trace
    if t is None or t.inference is not None:
        return
    now = time.monotonic()
    batched = entry.batched_at or now
    wall_now = time.time_ns()
    start = wall_now - int((now - batched) * 1e9)
    queued = wall_now - int((now - entry.queued_at) * 1e9)
    otel.tracer.start_span("queue", context=t.parent, start_time=queued).end(end_time=start)
    t.inference = otel.tracer.start_span("inference", context=t.parent, start_time=start)


def ended(stream: Stream, end: End) -> None:
    """The sequence's last token: its output on its `inference` span (and, for the one a client
    request reports, on the root)."""
    entry = stream.entry
    t = entry.trace
    if t is None:
        return
    _admit(entry)
    result = {
        "gen_ai.usage.output_tokens": end.generated_tokens,
        "gen_ai.response.finish_reasons": (end.finish_reason,),
        "ember.cached_tokens": stream.cached_tokens,
    }
    t.inference.set_attributes(result)
    t.inference.end()
    if stream.primary:
        t.root.set_attributes(result)
    _close(entry, t)


def failed(entry: Entry, error: BaseException) -> None:
    """The sequence failed (a shard error, the model went away): its open span and the root say so."""
    t = entry.trace
    if t is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span = t.inference or _queue_until_now(entry, t)
    for s in (span, t.root):
        s.record_exception(error)
        s.set_status(Status(StatusCode.ERROR, str(error)))
    span.end()
    _close(entry, t)


def closed(entry: Entry) -> None:
    """The request's reader is gone: a sequence not ended nor failed was cancelled (client gone)."""
    t = entry.trace
    if t is None:
        return
    span = t.inference or _queue_until_now(entry, t)
    span.set_attribute("ember.cancelled", True)
    span.end()
    _close(entry, t)


def _queue_until_now(entry: Entry, t: _EntryTrace) -> Any:
    """A sequence that ends before it was admitted: its `queue` span, from its arrival until now."""
    return otel.tracer.start_span("queue", context=t.parent, start_time=otel.epoch_ns(entry.queued_at))


def _close(entry: Entry, t: _EntryTrace) -> None:
    entry.trace = None
    if t.own_root:
        t.root.end()


# --- the batcher's hook: once per shard call --------------------------------------------------------------------


def step(call: Awaitable[T], action: Any, running: dict[int, Entry]) -> Awaitable[T]:
    """`call` (the batcher's handling of one scheduler action: a Forward or a Filter) under the step's span,
    which is current meanwhile so the shard calls carry it. `running`: the scheduler's running entries."""
    if otel.tracer is None:
        return call
    return _step(call, action, running)


async def _step(call: Awaitable[T], action: Any, running: dict[int, Entry]) -> T:
    from opentelemetry import context, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode

    from ember.router.scheduler import Filter

    if isinstance(action, Filter):
        newcomers: list[Entry] = []
        entries = [running[rid] for rid in action.keep if rid in running]
        name = "filter_batch" if action.keep else "clear_cache"
        attributes = {
            "ember.batch.id": action.batch.id,
            "ember.batch.size": len(action.keep),
            "ember.batch.removed": len(action.batch.request_ids) - len(action.keep),
        }
    else:
        newcomers = action.entries
        entries = [running[rid] for b in action.cached for rid in b.request_ids if rid in running] + newcomers
        name = action.method
        attributes = {"ember.batch.size": len(entries), "ember.batch.new_requests": len(newcomers)}
        if action.batch is not None:
            attributes["ember.batch.id"] = action.batch.id
        for entry in newcomers:
            _admit(entry)
    traced = [e for e in entries if e.trace is not None and e.trace.inference is not None]
    oldest = min(traced, key=lambda e: e.id, default=None)
    parent = trace.set_span_in_context(oldest.trace.inference) if oldest is not None else context.Context()
    links = [Link(e.trace.inference.get_span_context()) for e in traced if e is not oldest]
    span = otel.tracer.start_span(name, context=parent, kind=SpanKind.CLIENT, links=links, attributes=attributes)
    for entry in newcomers:
        if entry is not oldest and entry.trace is not None:
            entry.trace.inference.add_link(span.get_span_context(), {"ember.admitted": True})
    token = context.attach(trace.set_span_in_context(span))
    try:
        return await call
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, repr(exc)))
        raise
    finally:
        context.detach(token)
        span.end()


def step_failed(error: BaseException) -> None:
    """The current step's shard call failed (the batcher fails its requests and carries on)."""
    if otel.tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    span = trace.get_current_span()
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, str(error)))
