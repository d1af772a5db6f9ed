"""The OpenAPI operations and schemas of llama-cpp-python's /extras routes."""

from __future__ import annotations

from ember.router import openapi
from ember.router.openapi import obj, ref

_STR = {"type": "string"}
_INT = {"type": "integer"}


SCHEMAS = {
    # OpenAI's error object, plus FastAPI's `detail` list (routes.py).
    "ExtrasError": obj(
        ["error", "detail"],
        error=obj(
            ["message", "type"],
            message=_STR,
            type=_STR,
            param={"type": "string", "nullable": True},
            code={"type": "integer", "nullable": True},
        ),
        detail={
            "type": "array",
            "items": obj(["loc", "msg", "type"], msg=_STR, type=_STR, loc={"type": "array", "items": _STR}),
        },
    ),
    "TokenizeInputRequest": obj(["input"], model=_STR, input=_STR),
    "TokenizeInputResponse": obj(["tokens"], tokens={"type": "array", "items": _INT}),
    "TokenizeInputCountResponse": obj(["count"], count=_INT),
    "DetokenizeInputRequest": obj(["tokens"], model=_STR, tokens={"type": "array", "items": _INT}),
    "DetokenizeInputResponse": obj(["text"], text=_STR),
}


def _op(summary: str, body: str, ok: str) -> dict:
    error = {"description": "Error", "content": {"application/json": {"schema": ref("ExtrasError")}}}
    return {
        "tags": ["Extras"],
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(body)}}},
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": ref(ok)}}},
            "413": error,
            "422": error,
        },
    }


def register_all() -> None:
    for path, body, ok, summary in (
        ("/extras/tokenize", "TokenizeInputRequest", "TokenizeInputResponse", "Tokenize"),
        ("/extras/tokenize/count", "TokenizeInputRequest", "TokenizeInputCountResponse", "Count tokens"),
        ("/extras/detokenize", "DetokenizeInputRequest", "DetokenizeInputResponse", "Detokenize"),
    ):
        openapi.register(path, "post", _op(summary, body, ok), SCHEMAS)
