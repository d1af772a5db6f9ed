"""llama-cpp-python's /extras routes: tokenize, count tokens, detokenize.

Bodies and answers follow llama-cpp-python's schema (`{"input"}` →
`{"tokens"}` / `{"count"}`, `{"tokens"}` → `{"text"}`). Tokenizing adds the
model's special tokens, as llama.cpp does. Errors carry both OpenAI's
`error` object and FastAPI's `detail` list, so either kind of client reads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ember.router.errors import BodyError, EmberError, ValidationError, openai_body
from ember.router.http import read_json
from ember.router.models import body_model, model_state

if TYPE_CHECKING:
    from ember.router.app import AppState


def _error(exc: EmberError) -> Response:
    body = {**openai_body(exc), "detail": [{"loc": ["body"], "msg": exc.message, "type": exc.error_type}]}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers())


async def _body(request: Request, key: str, kind: type) -> tuple[AppState, Any]:
    state: AppState = request.app.state.ember
    body = await read_json(request, state.payload_limit)
    if not isinstance(body, dict) or not isinstance(body.get(key), kind):
        raise BodyError(f"`{key}` is required and must be a {'string' if kind is str else 'list'}")
    return await model_state(request, body_model(body)), body[key]


async def _ids(request: Request) -> list[int]:
    state, text = await _body(request, "input", str)
    return (await state.tokenizer.encode(text, True)).ids


async def tokenize(request: Request) -> Response:
    try:
        return JSONResponse({"tokens": await _ids(request)})
    except EmberError as exc:
        return _error(exc)


async def count(request: Request) -> Response:
    try:
        return JSONResponse({"count": len(await _ids(request))})
    except EmberError as exc:
        return _error(exc)


async def detokenize(request: Request) -> Response:
    try:
        state, tokens = await _body(request, "tokens", list)
        vocab = int(state.shard_info.get("vocab_size") or 0)
        if not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t and (not vocab or t < vocab) for t in tokens
        ):
            raise ValidationError(f"`tokens` must be token ids >= 0 and < {vocab}")
        return JSONResponse({"text": await state.tokenizer.decode(tokens)})
    except EmberError as exc:
        return _error(exc)


ROUTES = [
    Route("/extras/tokenize", tokenize, methods=["POST"]),
    Route("/extras/tokenize/count", count, methods=["POST"]),
    Route("/extras/detokenize", detokenize, methods=["POST"]),
]
