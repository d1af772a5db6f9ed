"""The OpenAPI operations and schemas of llama-cpp-python's /extras routes."""

from __future__ import annotations

from ember.router import openapi

_STR = {"type": "string"}
_INT = {"type": "integer"}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **props) -> dict:
    return {"type": "object", "required": required, "properties": props}


SCHEMAS = {
    # OpenAI's error object, plus FastAPI's `detail` list (routes.py).
    "ExtrasError": _obj(
        ["error", "detail"],
        error=_obj(
            ["message", "type"],
            message=_STR,
            type=_STR,
            param={"type": "string", "nullable": True},
            code={"type": "integer", "nullable": True},
        ),
        detail={
            "type": "array",
            "items": _obj(["loc", "msg", "type"], msg=_STR, type=_STR, loc={"type": "array", "items": _STR}),
        },
    ),
    "TokenizeInputRequest": _obj(["input"], model=_STR, input=_STR),
    "TokenizeInputResponse": _obj(["tokens"], tokens={"type": "array", "items": _INT}),
    "TokenizeInputCountResponse": _obj(["count"], count=_INT),
    "DetokenizeInputRequest": _obj(["tokens"], model=_STR, tokens={"type": "array", "items": _INT}),
    "DetokenizeInputResponse": _obj(["text"], text=_STR),
}


def _op(summary: str, body: str, ok: str) -> dict:
    error = {"description": "Error", "content": {"application/json": {"schema": _ref("ExtrasError")}}}
    return {
        "tags": ["Extras"],
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": _ref(ok)}}},
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
