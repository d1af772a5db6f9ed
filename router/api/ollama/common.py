"""What Ollama's routes share: errors, NDJSON streams, timestamps, durations, the request's model."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ember.durations import DurationError, keep_alive_seconds
from ember.router import tools as core_tools
from ember.router.errors import BodyError, EmberError, OverloadedError
from ember.router.http import read_json
from ember.router.models import model_state

if TYPE_CHECKING:
    from ember.router.app import AppState

NDJSON = "application/x-ndjson"
BUSY = "server busy, please try again.  maximum pending requests exceeded"


def error_status(exc: EmberError) -> int:
    """Ollama's status for an error: bad bodies are 400 (TGI's 422 is not Ollama's), overload is 503."""
    if isinstance(exc, OverloadedError):
        return 503
    if exc.status == 422:
        return 400
    return exc.status


def error_message(exc: EmberError) -> str:
    if isinstance(exc, OverloadedError):
        return BUSY
    return exc.message


def ollama_error(exc: EmberError) -> Response:
    """`{"error": "..."}` with Ollama's status (and Retry-After when busy)."""
    headers = {"Retry-After": "1"} if isinstance(exc, OverloadedError) else exc.headers()
    return JSONResponse({"error": error_message(exc)}, status_code=error_status(exc), headers=headers)


def error_line(exc: EmberError) -> bytes:
    """An error after a stream began: a last NDJSON line holding it."""
    return line({"error": error_message(exc)})


def line(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def ndjson(lines: AsyncIterator[bytes], on_close: Callable[[], None] | None = None) -> Response:
    """An NDJSON stream; `on_close` runs when it ends, however it ends (client gone included)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in lines:
                yield chunk
        finally:
            if on_close is not None:
                on_close()

    return StreamingResponse(body(), media_type=NDJSON)


def created_at(now: float | None = None) -> str:
    """RFC 3339 in UTC with nanoseconds, as Ollama writes `created_at`."""
    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{int((now % 1) * 1e9):09d}Z"


def ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


async def body_of(request: Request) -> dict:
    """The JSON object of a request (400 for anything else)."""
    state: AppState = request.app.state.ember
    body = await read_json(request, state.payload_limit)
    if not isinstance(body, dict):
        raise BodyError("expected a JSON object")
    return body


def model_name(body: dict, *, required: bool = True) -> str | None:
    """`model` (or the older `name`) of a body."""
    name = body.get("model", body.get("name"))
    if name is None and not required:
        return None
    if not isinstance(name, str) or not name:
        raise BodyError("model is required")
    return name


def stream_flag(body: dict) -> bool:
    """`stream`: true unless the body says false (null is absent, as in Ollama)."""
    value = body.get("stream")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise BodyError("stream must be a boolean")
    return value


def keep_alive_of(body: dict, default: float) -> float:
    try:
        return keep_alive_seconds(body.get("keep_alive"), default)
    except DurationError as exc:
        raise BodyError(str(exc)) from None


async def ollama_model(request: Request, body: dict) -> AppState:
    """The state of the model a body names, loaded if needed, with the body's keep_alive applied.
    Unknown names are 404 `model 'x' not found`, never the default model."""
    state: AppState = request.app.state.ember
    default = state.models.keep_alive if state.models is not None else 0.0
    return await model_state(request, model_name(body), fallback=False, keep_alive=keep_alive_of(body, default))


# ---- tools shared by the generation routes -----------------------------------------------------------
# Tool calling's grammar is the core's (`ember.router.tools`); only Ollama's wording and call shape are here.


_TOOL_WORDING = {
    "not_a_list": "tools: expected a non-empty list",
    "shape": 'tools: each tool must be {"type": "function", "function": {"name", "parameters"}}',
    "parameters": "tools: function {name}: parameters must be a JSON schema object",
}


def tool_functions(tools: Any) -> list[dict]:
    """The `function` objects of Ollama's (OpenAI-shaped) `tools`; a null or empty `parameters`
    means no arguments. The grammar and listing are the core's (`ember.router.tools`)."""
    try:
        return core_tools.tool_functions(tools, blank_parameters=True)
    except core_tools.ToolSpecError as exc:
        raise BodyError(_TOOL_WORDING[exc.problem].replace("{name}", str(exc.function))) from None


def read_tool_call(text: str) -> dict | None:
    """Ollama's tool call (`{"function": {"name", "arguments": {...}}}`) from generated text; None if it
    is not a whole call with object arguments (plain text, or one cut short)."""
    try:
        call = core_tools.read_call(text)
    except core_tools.CallError:
        return None
    if not isinstance(call.arguments, dict):
        return None
    return {"function": {"name": call.name, "arguments": call.arguments}}
