"""Tracing (`--otlp-endpoint`): one trace per request across the router and the shards, and nothing at all
without an endpoint.

The end-to-end test runs a real OTLP receiver (the TraceService Export RPC of `opentelemetry-proto`'s
generated code) on loopback and the launcher on the tiny model, and reads back what both processes
exported. The batching test drives the batcher over the fake shard of test_scheduler.py with an
in-memory exporter: a step serving several requests is a child of the oldest one and links the others.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from servers import Launcher, free_port
from test_scheduler import FakeShard, _entry, _within

from ember import tracing as otel
from ember.proto import generate_pb2 as pb
from ember.router.batcher import Batcher
from ember.router.client import ShardedClient
from ember.router.infer import Infer
from ember.router.limits import Limits
from ember.router.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def test_without_an_endpoint_nothing_of_opentelemetry_is_imported():
    """Every module on the request path is imported, the settings parsed and the hooks called with no
    endpoint: OpenTelemetry must stay out of the process."""
    script = """
import sys
from ember import tracing
import ember.launcher.main, ember.router.app, ember.router.cli, ember.router.infer, ember.router.batcher
import ember.router.client, ember.router.tracing, ember.shard.cli, ember.shard.server
import ember.router.api.tgi, ember.router.api.openai, ember.router.api.ollama
from ember.launcher.args import parse_args
router = ember.router.cli.parse_args(["--tokenizer-name", "x"])
shard = ember.shard.cli.parse_args(["serve"])
launcher = parse_args([])
assert None is router.otlp_endpoint is shard.otlp_endpoint is launcher.otlp_endpoint
assert "--otlp-endpoint" not in ember.launcher.args.router_flag_argv(launcher)
assert not tracing.setup(router.otlp_endpoint, router.otlp_service_name)
assert not tracing.setup(shard.otlp_endpoint, shard.otlp_service_name + ".shard")
assert tracing.server_interceptors() is None and tracing.outgoing() is None
from ember.router import tracing as hooks
coro = object()
assert hooks.step(coro, None, {}) is coro and hooks.validation(coro) is coro
from types import SimpleNamespace
entry = SimpleNamespace(trace=None)
hooks.submitted(entry); hooks.closed(entry); hooks.failed(entry, RuntimeError()); hooks.step_failed(RuntimeError())
assert entry.trace is None
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTLP_", "OTEL_"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- the batching design, in process ------------------------------------------------------------------------


@pytest.fixture
def exported():
    """Trace into memory for the test (tracing is off again afterwards)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel.install(provider)
    try:
        yield exporter
    finally:
        otel.uninstall()
        provider.shutdown()


def _infer(shared: bool) -> Infer:
    lim = Limits(max_batch_prefill_tokens=4096, max_batch_total_tokens=16384)
    metrics = Metrics(lim.max_input_tokens, lim.max_total_tokens)
    batcher = Batcher(FakeShard(), lim, metrics, shared_prefill=shared)
    return Infer(None, batcher, lim, metrics)


async def _request(infer: Infer, name: str, new_tokens: int, started: asyncio.Event | None = None):
    """One traced request: a root span, its sequence submitted and collected under it."""
    with otel.tracer.start_as_current_span(name):
        stream = infer.submit(_entry(4, new_tokens).request)
        if started is None:
            return await infer.collect(stream)
        async for item in infer.items(stream):
            started.set()
            if item.end is not None:
                return item


def _by_id(spans) -> dict:
    return {s.context.span_id: s for s in spans}


def test_a_step_is_a_child_of_the_oldest_request_and_links_the_others(exported):
    async def scenario():
        infer = _infer(shared=True)
        infer.batcher.start()
        first_token = asyncio.Event()
        older = asyncio.ensure_future(_request(infer, "older", 5, first_token))
        await first_token.wait()  # the older request runs: the newer one joins it in a shared prefill
        await _request(infer, "newer", 2)
        await older
        await infer.batcher.stop()

    _within(scenario())
    spans = exported.get_finished_spans()
    roots = {s.name: s for s in spans if s.parent is None}
    assert set(roots) == {"older", "newer"}
    inference, queue = {}, {}
    for s in spans:
        if s.name in ("inference", "queue"):
            owner = next(n for n, r in roots.items() if r.context.span_id == s.parent.span_id)
            (inference if s.name == "inference" else queue)[owner] = s
            assert s.context.trace_id == roots[owner].context.trace_id
    for name in roots:
        assert queue[name].end_time <= inference[name].start_time
    assert inference["older"].attributes["gen_ai.usage.output_tokens"] == 1  # the fake's count
    steps = [s for s in spans if s.name in ("prefill", "decode")]
    older_id, newer_id = inference["older"].context.span_id, inference["newer"].context.span_id
    # Every step runs the older request, the oldest: all are its children, in its trace.
    assert steps and all(s.parent.span_id == older_id for s in steps)
    together = [s for s in steps if s.attributes["ember.batch.size"] == 2]
    assert together, "no step ran both requests"
    for s in together:
        assert [link.context.span_id for link in s.links] == [newer_id]
    assert all(not s.links for s in steps if s.attributes["ember.batch.size"] == 1)
    # The newer request's inference span links back to the step that admitted it: the shared prefill.
    (admitted,) = inference["newer"].links
    shared = _by_id(spans)[admitted.context.span_id]
    assert shared.name == "prefill" and shared.attributes["ember.batch.new_requests"] == 1


def test_a_failed_step_and_its_requests_are_marked_failed(exported):
    from opentelemetry.trace import StatusCode

    async def scenario():
        infer = _infer(shared=False)
        infer.batcher.start()
        infer.batcher.client.fail_next_decode = True
        with pytest.raises(Exception, match="device lost"):
            await _request(infer, "request", 4)
        await infer.batcher.stop()

    _within(scenario())
    spans = {s.name: s for s in exported.get_finished_spans()}
    for name in ("decode", "inference", "request"):
        assert spans[name].status.status_code == StatusCode.ERROR, name
    assert spans["prefill"].status.status_code == StatusCode.UNSET


def test_the_client_sends_the_current_span_to_every_rank(exported):
    sent = []

    class Stub:
        def __getattr__(self, method):
            def call(request, timeout=None, metadata=None):
                sent.append(dict(metadata or ()))

                async def reply():
                    return pb.ClearCacheResponse()

                return reply()

            return call

    class Rank:
        stub = Stub()

    async def scenario():
        client = ShardedClient([Rank(), Rank()])
        await client.clear_cache()  # no current span: nothing to carry
        with otel.tracer.start_as_current_span("step") as span:
            await client.clear_cache(1)
        return span

    span = _within(scenario())
    trace_id = format(span.get_span_context().trace_id, "032x")
    span_id = format(span.get_span_context().span_id, "016x")
    assert sent[:2] == [{}, {}]
    assert [m["traceparent"].rsplit("-", 1)[0] for m in sent[2:]] == [f"00-{trace_id}-{span_id}"] * 2


# ---- end to end: the launcher, its router and shard, a real OTLP receiver -------------------------------------


class Receiver:
    """An OTLP/gRPC trace receiver on loopback: keeps every exported span with its service name."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans: list[tuple[str, object]] = []
        self.arrived = threading.Condition()
        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                got = []
                for resource_spans in request.resource_spans:
                    attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        got += [(attrs.get("service.name", ""), span) for span in scope_spans.spans]
                with receiver.arrived:
                    receiver.spans += got
                    receiver.arrived.notify_all()
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def wait_for(self, predicate, timeout: float):
        """`predicate(spans)` once it holds, woken by each export; TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                found = predicate(list(self.spans))
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({(service, span.name) for service, span in self.spans})
                    raise TimeoutError(f"spans incomplete after {timeout}s; got {names}")
                self.arrived.wait(left)

    def stop(self) -> None:
        self.server.stop(0)


def _attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


def _request_trace(spans):
    """The spans of the one /generate request's trace, once the router's and every step's shard spans
    are in: {name: [span, ...]} with each span's service; None until then."""
    root = next((s for service, s in spans if service == "ember" and s.name == "generate"), None)
    if root is None:
        return None
    trace = [(service, s) for service, s in spans if s.trace_id == root.trace_id]
    steps = {s.span_id for service, s in trace if service == "ember" and s.name in ("prefill", "decode")}
    served = {s.parent_span_id for service, s in trace if service == "ember.shard"}
    if not steps or not steps <= served:
        return None
    by_name: dict[str, list] = {}
    for service, s in trace:
        by_name.setdefault(s.name, []).append((service, s))
    return by_name


def test_one_trace_spans_the_router_and_the_shard(tiny_llama_dir, tmp_path):
    receiver = Receiver()
    port = free_port()
    launcher = Launcher(
        *("--model-id", str(tiny_llama_dir), "--shard-uds-path", str(tmp_path / "ember")),
        *("--port", str(port), "--hostname", "127.0.0.1", "--master-port", str(free_port())),
        *("--max-total-tokens", "512", "--max-input-tokens", "256", "--max-batch-prefill-tokens", "512"),
        *("--kv-cache-bytes", "4MiB"),
        *("--otlp-endpoint", f"http://127.0.0.1:{receiver.port}"),
        env={"OTEL_BSP_SCHEDULE_DELAY": "100"},  # the SDK's batch processor exports every 100 ms
    )
    try:
        launcher.wait_for_line("[launcher] serving ")
        body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 3, "ignore_eos": True, "temperature": 0.5}}
        reply = httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        trace = receiver.wait_for(_request_trace, timeout=60)
    finally:
        launcher.kill()
        receiver.stop()

    def one(name):
        (service, span), *rest = trace[name]
        assert not rest, f"{len(rest) + 1} {name} spans"
        return service, span

    _, root = one("generate")
    assert root.parent_span_id == b""
    attrs = _attributes(root)
    assert attrs["gen_ai.usage.output_tokens"] == 3 and attrs["gen_ai.request.max_tokens"] == 3
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.request.model"] == str(tiny_llama_dir)
    assert abs(attrs["gen_ai.request.temperature"] - 0.5) < 1e-6
    for name in ("validation", "queue", "inference"):
        service, span = one(name)
        assert service == "ember" and span.parent_span_id == root.span_id, name
    _, inference = one("inference")
    _, queue = one("queue")
    assert queue.end_time_unix_nano <= inference.start_time_unix_nano
    # One request: every step is its own, a child of its inference span; each step's shard call a child of it.
    steps = [s for name in ("prefill", "decode") for service, s in trace.get(name, []) if service == "ember"]
    assert [s.name for s in steps].count("prefill") == 1 and len(steps) >= 2
    assert all(s.parent_span_id == inference.span_id and not s.links for s in steps)
    calls = [(service, s) for name in ("Prefill", "Decode") for service, s in trace.get(name, [])]
    assert {service for service, _ in calls} == {"ember.shard"}
    by_step = {s.span_id: s.name for s in steps}
    assert sorted(by_step[s.parent_span_id].capitalize() for _, s in calls) == sorted(s.name for _, s in calls)
    assert all(_attributes(s)["ember.generations"] == 1 for _, s in calls)
