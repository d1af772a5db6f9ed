"""The Starlette application: shared state, the service routes, middleware.

`create_app(state)` wires TGI's routes (`api/tgi/`) and the service routes
(/info, /health, /ping, /metrics, /tokenize, /openapi.json, /docs). Other
API families (OpenAI, Ollama, Jan) pass their routes in `extra_routes` and
register their `/invocations` shapes in `state.invocation_handlers`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from ember import __version__
from ember.router import openapi
from ember.router.api import tgi
from ember.router.client import ShardedClient
from ember.router.errors import EmberError, UnhealthyError, error_response
from ember.router.http import DIRECT_SEND, ApiKeyMiddleware, RequestIdMiddleware, read_json
from ember.router.infer import Infer
from ember.router.limits import Limits
from ember.router.metrics import Metrics
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
}


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
    """200 only when every shard answers Health."""
    state = _state(request)
    try:
        await state.client.health()
    except Exception as exc:
        log.warning("health check failed: %s", exc)
        return error_response(UnhealthyError())
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def tokenize(request: Request) -> Response:
    """TGI's SimpleToken list: ids with character offsets into `inputs`."""
    state = _state(request)
    try:
        req = request_from_tgi(await read_json(request, state.payload_limit))
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
    Route("/", health, methods=["GET"]),
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
        if scope["type"] == "http":
            scope[DIRECT_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(state: AppState, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    middleware = [Middleware(RequestIdMiddleware)]
    if state.api_key:
        middleware.append(
            Middleware(
                ApiKeyMiddleware,
                api_key=state.api_key,
                protected=lambda method, path: method == "POST" and path in PROTECTED,
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
        state.infer.batcher.start()
        try:
            yield
        finally:
            await state.infer.batcher.stop()
            await state.client.close()
            state.tokenizer.close()

    app = _App(routes=[*tgi.ROUTES, *SERVICE_ROUTES, *(extra_routes or [])], middleware=middleware, lifespan=lifespan)
    app.state.ember = state
    return app
