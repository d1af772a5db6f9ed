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
from ember.router.errors import BodyError, EmberError, OverloadedError
from ember.router.http import read_json
from ember.router.models import model_state
from ember.router.types import Grammar

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


# ---- text and tools shared by the generation routes ------------------------------------------------
# API families do not import each other, so the small pieces of OpenAI's stop and tool handling the
# Ollama routes need live here too, written for Ollama's shapes.


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the earliest stop sequence in it (Ollama leaves stop sequences out of answers)."""
    found = [at for at in (text.find(s) for s in stops if s) if at >= 0]
    return text[: min(found)] if found else text


class StopFilter:
    """Streamed pieces with stop sequences left out: what might begin one is held until it cannot."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.margin = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, piece: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        look_from = max(len(self.text) - self.margin, 0)
        self.text += piece
        end = len(self.text)
        for s in self.stops:
            at = self.text.find(s, look_from)
            if 0 <= at < end:
                end = at
        if end < len(self.text):
            self.stopped = final = True
        upto = end if final else max(end - self.margin, self.sent)
        out = self.text[self.sent : upto]
        self.sent = upto
        return out


TOOL_PROMPT = (
    "You can call one of the functions below. To call one, answer with only a JSON object "
    '{"name": <function name>, "arguments": <arguments object>}.'
)
FREE_TEXT = r"[^{\s][\s\S]*"
"""Under automatic tool choice, an answer that does not open with `{` is plain text."""


def tool_functions(tools: Any) -> list[dict]:
    """The `function` objects of Ollama's (OpenAI-shaped) `tools`, each with a parameters schema."""
    if not isinstance(tools, list) or not tools:
        raise BodyError("tools: expected a non-empty list")
    out = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BodyError('tools: each tool must be {"type": "function", "function": {"name", "parameters"}}')
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise BodyError(f"tools: function {fn['name']}: parameters must be a JSON schema object")
        out.append({**fn, "parameters": params})
    return out


def tool_grammar(functions: list[dict], required: bool) -> Grammar:
    """Exactly one `{"name", "arguments"}` call of one of `functions`; unless `required`, or a text answer."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if required:
        return Grammar("json", schema)
    from ember.router.grammar import compile_grammar

    _, call = compile_grammar(Grammar("json", schema), validate=False)
    return Grammar("regex", f"({call})|({FREE_TEXT})")


def tool_listing(functions: list[dict]) -> str:
    """The tools as text, appended to the last message when the chat template does not render them."""
    shown = [
        {"name": f["name"], "description": f.get("description", ""), "parameters": f["parameters"]} for f in functions
    ]
    return f"\n---\n{TOOL_PROMPT}\n{json.dumps(shown, ensure_ascii=False)}"


def read_tool_call(text: str) -> dict | None:
    """Ollama's tool call (`{"function": {"name", "arguments": {...}}}`) from generated text; None if it
    is not a whole call (plain text, or one cut short)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if (
        not isinstance(call, dict)
        or not isinstance(call.get("name"), str)
        or not isinstance(call.get("arguments"), dict)
    ):
        return None
    return {"function": {"name": call["name"], "arguments": call["arguments"]}}
