"""The Starlette application: shared state, the service routes, middleware.

`create_app(state)` wires TGI's routes (`api/tgi/`) and the service routes
(/info, /health, /ping, /metrics, /tokenize, /openapi.json, /docs). Other
API families (OpenAI, Ollama, Jan) pass their routes in `extra_routes` and
register their `/invocations` shapes in `state.invocation_handlers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Receive, Scope, Send

from ember import __version__
from ember.router import openapi, tracing
from ember.router.api import tgi
from ember.router.client import ShardedClient
from ember.router.errors import DrainingError, EmberError, UnhealthyError, error_response, openai_response
from ember.router.http import DIRECT_SEND, ApiKeyMiddleware, RequestIdMiddleware, read_json
from ember.router.infer import Infer
from ember.router.limits import Limits
from ember.router.metrics import Metrics, ServerMetrics, render_models
from ember.router.models import Models, Served, Target, model_state, release_leases
from ember.router.tokenizer import TokenizerPool
from ember.router.types import request_from_tgi

log = logging.getLogger("ember.router.app")

InvocationHandler = Callable[[Request, dict, float], Awaitable[Response]]

# Routes behind --api-key (TGI's set).
PROTECTED = {
    "/",
    "/generate",
    "/generate_stream",
    "/invocations",
    "/tokenize",
    "/v1/chat/completions",
    "/v1/completions",
    "/vertex",
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
}


MANAGEMENT_PREFIXES = ("/v1/models", "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs")
"""Routes under these prefixes that change the model library or what is loaded need the API key."""


def manages_models(method: str, path: str) -> bool:
    """Downloads, uploads, creations, copies, deletes, starts and stops (Jan's and Ollama's routes)."""
    if not path.startswith(MANAGEMENT_PREFIXES):
        return False
    return method in ("POST", "PUT", "DELETE") or path.startswith("/v1/models/download/")


PROBES = frozenset({"/health", "/ping", "/metrics", "/info"})
"""Answered while draining and not counted as traffic: probes and scrapes."""


class Traffic:
    """The HTTP requests in flight (not counting probes), and whether the server is draining.

    SIGTERM starts the drain (router/cli.py): /health and /ping answer 503 so load balancers stop
    sending, new requests get 503 with `Connection: close` (a load balancer may retry them elsewhere:
    nothing was started), and those in flight, streams included, run to their end. The server stops
    listening and exits as soon as the last one ends."""

    def __init__(self) -> None:
        self.active = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight, at most `timeout` seconds; whether it came to that."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass
class AppState:
    infer: Infer
    client: ShardedClient
    tokenizer: TokenizerPool
    limits: Limits
    metrics: Metrics
    model_id: str
    model_sha: str | None = None
    shard_info: dict[str, Any] = field(default_factory=dict)
    payload_limit: int = 2_000_000
    compute_type: str = "cpu+optimized"
    api_key: str | None = None
    cors_allow_origin: list[str] = field(default_factory=list)
    invocation_handlers: dict[str, InvocationHandler] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    models: Models | None = None
    chat_template: Any = None
    model_management: bool = True
    target: Target | None = None
    traffic: Traffic = field(default_factory=Traffic)
    server_metrics: ServerMetrics = field(default_factory=ServerMetrics)

    def view(self, served: Served, target: Target, template: Any = None) -> AppState:
        """This state as one request sees it: the model it named (a view; the app's state is unchanged)."""
        default_name = target.group is None and target.manifest is None
        return replace(
            self,
            infer=served.infer,
            client=served.client,
            tokenizer=served.tokenizer,
            limits=served.limits,
            metrics=served.metrics,
            model_id=self.model_id if default_name else target.name,
            model_sha=served.model_sha,
            shard_info=served.shard_info,
            chat_template=template or served.template,
            target=target,
        )

    def info(self) -> dict:
        """TGI's Info schema, plus the shard facts and batching limits Ember knows."""
        lim = self.limits
        return {
            "model_id": self.model_id,
            "model_sha": self.model_sha,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": lim.max_concurrent_requests,
            "max_best_of": lim.max_best_of,
            "max_stop_sequences": lim.max_stop_sequences,
            "max_input_tokens": lim.max_input_tokens,
            "max_total_tokens": lim.max_total_tokens,
            "validation_workers": lim.validation_workers,
            "max_client_batch_size": lim.max_client_batch_size,
            "router": "ember-router",
            "version": __version__,
            "sha": _env("EMBER_SHA"),
            "docker_label": _env("DOCKER_LABEL"),
            "max_top_n_tokens": lim.max_top_n_tokens,
            "max_batch_prefill_tokens": lim.max_batch_prefill_tokens,
            "max_batch_total_tokens": lim.max_batch_total_tokens,
            "max_waiting_tokens": lim.max_waiting_tokens,
            "waiting_served_ratio": lim.waiting_served_ratio,
            "max_batch_size": lim.max_batch_size,
            **self.shard_info,
        }


def _env(name: str) -> str | None:
    import os

    return os.environ.get(name) or None


def _state(request: Request) -> AppState:
    return request.app.state.ember


async def info(request: Request) -> Response:
    return JSONResponse(_state(request).info())


async def health(request: Request) -> Response:
    """200 when the server can serve: the default model's shards all answer Health (or, when it was
    stopped on purpose, the launcher can load it again). Other models' state does not count."""
    state = _state(request)
    if state.traffic.draining:
        return error_response(DrainingError())
    models = state.models
    try:
        if models is not None and models.served(models.target(None)) is None:
            await models.control.list()
        else:
            client = models.default.client if models is not None else state.client
            await client.health()
    except Exception as exc:
        log.warning("health check failed: %s", exc)
        return error_response(UnhealthyError())
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    state = _state(request)
    text = state.metrics.render() if state.models is None else render_models(state.models)
    text += state.server_metrics.render()
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def tokenize(request: Request) -> Response:
    """TGI's SimpleToken list: ids with character offsets into `inputs`."""
    state = _state(request)
    try:
        req = request_from_tgi(await read_json(request, state.payload_limit))
        state = await model_state(request)
        enc = await state.tokenizer.encode(req.inputs, req.add_special_tokens)
    except EmberError as exc:
        return error_response(exc)
    tokens = [{"id": i, "text": req.inputs[a:b], "start": a, "stop": b} for i, (a, b) in zip(enc.ids, enc.offsets)]
    return JSONResponse(tokens)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document(request.app.routes))


async def docs(request: Request) -> Response:
    return HTMLResponse(openapi.SWAGGER_HTML)


SERVICE_ROUTES = [
    Route("/info", info, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/ping", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
]


class _App(Starlette):
    """Starlette that leaves the server's `send` in each HTTP scope (http.DIRECT_SEND), for
    EventStream's per-token frames. Middleware added here must rewrite only
    `http.response.start` (headers), never body messages: event streams' bodies skip them."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope[DIRECT_SEND] = send
        state: AppState = self.state.ember
        probe = scope["path"] in PROBES
        if state.traffic.draining and not probe:
            await self._refuse(scope, receive, send)
            return
        status = 500  # unless a response starts
        if not probe:
            state.traffic.enter()

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await super().__call__(scope, receive, send_status)
        finally:
            release_leases(scope)  # the response has ended: the request's models may expire
            if not probe:
                state.traffic.leave()
            self._count(scope, status)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request that arrived while draining: 503, the connection closed after it."""
        exc = DrainingError()
        scope["route"] = next((r for r in self.router.routes if r.matches(scope)[0] == Match.FULL), None)
        response = openai_response(exc) if scope["path"].startswith("/v1/") else error_response(exc)
        response.headers["connection"] = "close"
        await response(scope, receive, send)
        self._count(scope, exc.status)

    def _count(self, scope: Scope, status: int) -> None:
        label = getattr(scope.get("route"), "path", None) or "other"  # the template: bounded label values
        self.state.ember.server_metrics.http_requests.inc(label, str(status))


def create_app(state: AppState, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    middleware = [Middleware(RequestIdMiddleware)]
    if tracing.enabled():  # --otlp-endpoint: a root span per generation request
        middleware.append(Middleware(tracing.RequestSpans))
    if state.api_key:
        middleware.append(
            Middleware(
                ApiKeyMiddleware,
                api_key=state.api_key,
                protected=lambda method, path: (method == "POST" and path in PROTECTED) or manages_models(method, path),
            )
        )
    middleware.append(
        Middleware(
            CORSMiddleware,
            allow_origins=state.cors_allow_origin or ["*"],
            allow_methods=["GET", "POST"],
            allow_headers=["content-type"],
        )
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if state.infer.batcher.task is None:
            state.infer.batcher.start()
        if state.models is not None:
            state.models.start()
        try:
            yield
        finally:
            if state.models is not None:
                await state.models.stop()
            default = state.models.default if state.models is not None else None
            infer, client, tokenizer = (
                (default.infer, default.client, default.tokenizer)
                if default is not None
                else (state.infer, state.client, state.tokenizer)
            )
            await infer.batcher.stop()
            await client.close()
            tokenizer.close()

    app = _App(routes=[*tgi.ROUTES, *SERVICE_ROUTES, *(extra_routes or [])], middleware=middleware, lifespan=lifespan)
    app.state.ember = state
    return app
