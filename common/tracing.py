"""OpenTelemetry tracing, exported over OTLP/gRPC: on with `--otlp-endpoint`, off (and free) without it.

Off is the default and costs nothing: this module imports nothing of OpenTelemetry until `setup()`
is given an endpoint, `tracer` stays None, and every hook (here and in `ember.router.tracing`)
returns at once on that check. Nothing is traced per token, on or off.

On, each process exports its own spans (the SDK's BatchSpanProcessor: a background thread, the
standard OTEL_BSP_* / OTEL_TRACES_SAMPLER variables apply) under its own service name: the router
as `--otlp-service-name`, the shards as that name plus `.shard`. One trace spans both: the router
puts W3C trace context (`traceparent`) in the gRPC metadata of its shard calls (`outgoing()`), and
the shard's server interceptor (`server_interceptors()`) makes a span per call, a child of it.
docs/architecture.md ("Tracing") says which spans there are and how continuous batching is traced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("ember.tracing")

# The process's Tracer once `setup()` was given an endpoint; None: tracing is off.
tracer: Any = None

# Shard calls not traced even when tracing is on: Health answers every /health probe and would fill the
# collector with one-span traces.
UNTRACED_METHODS = frozenset({"Health"})


def enabled() -> bool:
    return tracer is not None


def setup(endpoint: str | None, service_name: str, attributes: Mapping[str, Any] | None = None) -> bool:
    """Export this process's spans to `endpoint` (OTLP over gRPC) as `service_name`; no endpoint: nothing
    happens and nothing is imported. Returns whether tracing is on."""
    if not endpoint:
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from ember import __version__

    url = endpoint if "://" in endpoint else f"http://{endpoint}"  # a bare `host:4317` means plain gRPC
    resource = Resource.create({"service.name": service_name, "service.version": __version__, **(attributes or {})})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    trace.set_tracer_provider(provider)  # for any library that traces through the global provider
    install(provider)
    log.info("tracing: spans go to %s (OTLP/gRPC) as service %r", url, service_name)
    return True


def install(provider: Any) -> None:
    """Trace with `provider` (an SDK TracerProvider); `setup()` calls it, tests call it with their own."""
    global tracer
    from ember import __version__

    tracer = provider.get_tracer("ember", __version__)


def uninstall() -> None:
    """Tracing off again (tests)."""
    global tracer
    tracer = None


def epoch_ns(monotonic_s: float) -> int:
    """A `time.monotonic()` reading as the wall-clock nanoseconds spans are timed in."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


# --- propagation over gRPC ---------------------------------------------------------------------------------------


def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    global _PROPAGATOR
    if _PROPAGATOR is None:
        _PROPAGATOR = TraceContextTextMapPropagator()
    return _PROPAGATOR


_PROPAGATOR: Any = None


def outgoing() -> list[tuple[str, str]] | None:
    """gRPC metadata carrying the current span's context (W3C `traceparent`); None when tracing is off
    or no span is current."""
    if tracer is None:
        return None
    carrier: dict[str, str] = {}
    _propagator().inject(carrier)
    return list(carrier.items()) or None


def incoming(metadata: Any) -> Any:
    """The OpenTelemetry Context that gRPC `metadata` (key/value pairs) carries; an empty one if none."""
    carrier = {}
    for item in metadata or ():
        key, value = item[0], item[1]
        if isinstance(value, str):
            carrier[key.lower()] = value
    return _propagator().extract(carrier)


def server_interceptors() -> list[Any] | None:
    """The shard's gRPC server interceptors: a span per call while tracing is on; None when off."""
    if tracer is None:
        return None
    return [_server_interceptor()]


def _server_interceptor() -> Any:
    import grpc
    from opentelemetry.trace import SpanKind, Status, StatusCode

    class ServerSpans(grpc.aio.ServerInterceptor):
        """A SERVER span per unary call, named by the method (`Prefill`, `Decode`, ...), a child of the
        caller's span when the call's metadata carries one."""

        async def intercept_service(self, continuation, details):
            handler = await continuation(details)
            service, _, method = details.method.lstrip("/").rpartition("/")
            if handler is None or handler.unary_unary is None or method in UNTRACED_METHODS:
                return handler
            behavior = handler.unary_unary
            metadata = details.invocation_metadata

            async def traced(request, context):
                attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
                attributes.update(describe_request(method, request))
                with tracer.start_as_current_span(
                    method,
                    context=incoming(metadata),
                    kind=SpanKind.SERVER,
                    attributes=attributes,
                    set_status_on_exception=False,
                ) as span:
                    try:
                        reply = await behavior(request, context)
                    except BaseException as exc:
                        code = context.code()  # set by context.abort: the status the router gets
                        if code is not None:
                            span.set_attribute("rpc.grpc.status_code", code.value[0])
                        span.set_status(Status(StatusCode.ERROR, str(context.details() or repr(exc))))
                        raise
                    span.set_attributes(describe_reply(method, reply))
                    return reply

            return grpc.unary_unary_rpc_method_handler(
                traced,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

    return ServerSpans()


def describe_request(method: str, request: Any) -> dict[str, Any]:
    """What a shard span says about its call: the batches it names and their sizes."""
    if method == "Prefill":
        out = {"ember.batch.id": request.batch.id, "ember.batch.new_requests": len(request.batch.requests)}
        if request.HasField("cached_batch"):
            out["ember.batch.cached_id"] = request.cached_batch.id
            out["ember.batch.cached_requests"] = len(request.cached_batch.request_ids)
        out["ember.prompt_budget"] = request.prompt_budget
        return out
    if method == "Decode":
        return {
            "ember.batch.ids": [b.id for b in request.batches],
            "ember.batch.size": sum(len(b.request_ids) for b in request.batches),
            "ember.prompt_budget": request.prompt_budget,
        }
    if method == "FilterBatch":
        return {"ember.batch.id": request.batch_id, "ember.batch.size": len(request.request_ids)}
    if method == "ClearCache" and request.HasField("id"):
        return {"ember.batch.id": request.id}
    return {}


def describe_reply(method: str, reply: Any) -> dict[str, Any]:
    """What a Prefill/Decode reply says about the step: its forward, sampling and the tokens it ran."""
    if method not in ("Prefill", "Decode"):
        return {}
    return {
        "ember.generations": len(reply.generations),
        "ember.forward_ms": reply.forward_ns / 1e6,
        "ember.sampling_ms": reply.decode_ns / 1e6,  # sampling, stop checks and detokenisation
        "ember.decode_rows": reply.decode_rows,
        "ember.prompt_tokens": reply.prompt_tokens,
        "ember.batch.kv_tokens": reply.batch.current_tokens if reply.HasField("batch") else 0,
    }
