"""HTTP plumbing shared by every route family: bodies, disconnects, SSE, middleware."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.router.errors import ClientDisconnected, PayloadTooLarge
from ember.router.types import parse_json

T = TypeVar("T")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 beyond `limit` bytes (checked while reading), 422 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client goes away first (non-streaming routes).

    The request's body has been read already, so the next receive() only
    completes when the connection closes.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()


# The scope key under which the app (app.create_app) leaves the server's own `send`.
DIRECT_SEND = "ember.direct_send"


class EventStream:
    """An SSE response that stops its producer the moment the client disconnects.

    `events` yields ready-made `data:...\\n\\n` frames; `on_close` runs however
    the stream ends (finished, failed or client gone).

    The response start goes through the middleware (CORS and request-id headers,
    Starlette's error bookkeeping); the body frames, one per token, go straight
    to the server's `send` when the app left it in the scope (DIRECT_SEND): the
    router's middleware only rewrite `http.response.start`, and each layer costs a
    coroutine call per token.
    """

    def __init__(
        self, events: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str] | None = None
    ) -> None:
        self.events = events
        self.on_close = on_close
        self.headers = {
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
            **(headers or {}),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        pump = asyncio.ensure_future(self._pump(scope.get(DIRECT_SEND, send)))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watcher):
                task.cancel()
            await asyncio.gather(pump, watcher, return_exceptions=True)
            await self.events.aclose()
            self.on_close()

    async def _pump(self, send: Send) -> None:
        async for frame in self.events:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class RequestIdMiddleware:
    """Accept `x-request-id` (or make one), expose it to handlers, echo it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = rid or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """TGI's --api-key: `Authorization: Bearer KEY` (case-insensitive) on generation routes."""

    def __init__(self, app: ASGIApp, api_key: str, protected: Callable[[str, str], bool]) -> None:
        self.app = app
        self.expected = f"bearer {api_key}".lower()
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.protected(scope["method"], scope["path"]):
            auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
            if auth.lower() != self.expected:
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)
