"""POST /v1/embeddings: OpenAI's embeddings through the shards' Embed rpc.

Inputs are strings or token arrays (one or a list); each is tokenized once,
checked against max_input_tokens, and embedded in one Embed call (the
shard mean-pools and L2-normalises the last hidden states). `encoding_format`
"base64" is the little-endian float32 bytes OpenAI's client decodes;
`dimensions` is accepted only when it equals the model's hidden size (the
vectors are not truncatable).
"""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember.router.api.openai.common import field, openai_error, usage
from ember.router.errors import BodyError, EmberError, ValidationError
from ember.router.http import read_json, unless_disconnected
from ember.router.models import body_model, model_state

if TYPE_CHECKING:
    from ember.router.app import AppState

MAX_INPUTS = 2048  # OpenAI's limit per request


def _inputs(value: Any) -> list[str | list[int]]:
    """A string, a token array, or a list of either."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BodyError("input: expected a string, a token array, or a non-empty list of them")
    for item in value:
        ok = isinstance(item, str) or (
            isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        )
        if not ok:
            raise BodyError("input: every item must be a string or a list of token ids")
    if len(value) > MAX_INPUTS:
        raise ValidationError(f"`input` may hold at most {MAX_INPUTS} items. Given: {len(value)}")
    return value


async def _token_lists(state: AppState, inputs: list[str | list[int]]) -> list[list[int]]:
    vocab = int(state.shard_info.get("vocab_size") or 0)
    out = []
    for item in inputs:
        ids = (await state.tokenizer.encode(item)).ids if isinstance(item, str) else item
        if not ids:
            raise ValidationError("`input` cannot be empty")
        if len(ids) > state.limits.max_input_tokens:
            raise ValidationError(
                f"`input` must have less than {state.limits.max_input_tokens} tokens. Given: {len(ids)}"
            )
        if vocab and any(t < 0 or t >= vocab for t in ids):
            raise ValidationError(f"token ids must be >= 0 and < {vocab}")
        out.append(list(ids))
    return out


def _encode(values: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


def _check(body: Any, state: AppState) -> str:
    if not isinstance(body, dict):
        raise BodyError("expected a JSON object")
    if state.shard_info.get("supports_embeddings") is False:
        raise ValidationError("this model does not serve embeddings")
    fmt = field(body, "encoding_format", (str,), "float")
    if fmt not in ("float", "base64"):
        raise ValidationError(f"`encoding_format` must be `float` or `base64`. Given: {fmt}")
    dims = field(body, "dimensions", (int,))
    hidden = state.shard_info.get("hidden_size")
    if dims is not None and dims != hidden:
        raise ValidationError(f"`dimensions` is not supported: this model's embeddings have {hidden} dimensions")
    return fmt


async def embeddings(request: Request) -> Response:
    state: AppState = request.app.state.ember
    try:
        body = await read_json(request, state.payload_limit)
        state = await model_state(request, body_model(body))
        fmt = _check(body, state)
        token_lists = await _token_lists(state, _inputs(body.get("input")))
        vectors = await unless_disconnected(request, state.infer.embed(token_lists))
    except EmberError as exc:
        return openai_error(exc)
    data = [{"object": "embedding", "index": i, "embedding": _encode(vector, fmt)} for i, vector in enumerate(vectors)]
    n = sum(len(t) for t in token_lists)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": body.get("model") or state.model_id,
            "usage": {k: v for k, v in usage(n, 0).items() if k != "completion_tokens"},
        }
    )
