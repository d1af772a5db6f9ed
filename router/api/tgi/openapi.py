"""TGI's part of the OpenAPI document: its schemas and the operations of its routes.

Follows the steering repo's `specs/tgi-openapi.json`. The service routes the app serves
itself (/info, /health, /ping, /metrics, /tokenize) are TGI's too and listed
here; `register_all` adds everything to the document (router/openapi.py).
"""

from __future__ import annotations

from ember.router import openapi
from ember.router.openapi import obj, ref

_INT = {"type": "integer", "minimum": 0}
_NINT = {"type": "integer", "minimum": 0, "nullable": True}
_NUM = {"type": "number", "nullable": True}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}

SCHEMAS: dict[str, dict] = {
    "ErrorResponse": obj(["error", "error_type"], error=_STR, error_type=_STR),
    "GrammarType": {
        "oneOf": [
            obj(
                ["type", "value"],
                type={"type": "string", "enum": ["json"]},
                value={"description": "A JSON schema, as an object or a string holding one"},
            ),
            obj(["type", "value"], type={"type": "string", "enum": ["regex"]}, value=_STR),
        ],
        "discriminator": {"propertyName": "type"},
    },
    "GenerateParameters": obj(
        [],
        best_of=_NINT,
        decoder_input_details=_BOOL,
        details=_BOOL,
        do_sample=_BOOL,
        frequency_penalty=_NUM,
        grammar={"allOf": [ref("GrammarType")], "nullable": True},
        max_new_tokens=_NINT,
        repetition_penalty=_NUM,
        return_full_text={"type": "boolean", "nullable": True},
        seed=_NINT,
        stop={"type": "array", "items": _STR},
        temperature=_NUM,
        top_k=_NINT,
        top_n_tokens=_NINT,
        top_p={"type": "number", "nullable": True, "maximum": 1, "exclusiveMinimum": 0},
        truncate=_NINT,
        typical_p={"type": "number", "nullable": True, "maximum": 1, "exclusiveMinimum": 0},
        watermark=_BOOL,
        adapter_id={"type": "string", "nullable": True},
    ),
    "GenerateRequest": obj(["inputs"], inputs=_STR, parameters=ref("GenerateParameters")),
    "CompatGenerateRequest": obj(["inputs"], inputs=_STR, parameters=ref("GenerateParameters"), stream=_BOOL),
    "FinishReason": {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]},
    "Token": obj(["id", "text", "logprob", "special"], id=_INT, text=_STR, logprob=_NUM, special=_BOOL),
    "PrefillToken": obj(["id", "text", "logprob"], id=_INT, text=_STR, logprob=_NUM),
    "BestOfSequence": obj(
        ["generated_text", "finish_reason", "generated_tokens", "prefill", "tokens"],
        generated_text=_STR,
        finish_reason=ref("FinishReason"),
        generated_tokens=_INT,
        seed=_NINT,
        prefill={"type": "array", "items": ref("PrefillToken")},
        tokens={"type": "array", "items": ref("Token")},
        top_tokens={"type": "array", "items": {"type": "array", "items": ref("Token")}},
    ),
    "Details": obj(
        ["finish_reason", "generated_tokens", "prefill", "tokens"],
        finish_reason=ref("FinishReason"),
        generated_tokens=_INT,
        seed=_NINT,
        prefill={"type": "array", "items": ref("PrefillToken")},
        tokens={"type": "array", "items": ref("Token")},
        top_tokens={"type": "array", "items": {"type": "array", "items": ref("Token")}},
        best_of_sequences={"type": "array", "items": ref("BestOfSequence"), "nullable": True},
    ),
    "GenerateResponse": obj(
        ["generated_text"], generated_text=_STR, details={"allOf": [ref("Details")], "nullable": True}
    ),
    "StreamDetails": obj(
        ["finish_reason", "generated_tokens", "input_length"],
        finish_reason=ref("FinishReason"),
        generated_tokens=_INT,
        input_length=_INT,
        seed=_NINT,
    ),
    "StreamResponse": obj(
        ["index", "token"],
        index=_INT,
        token=ref("Token"),
        top_tokens={"type": "array", "items": ref("Token")},
        generated_text={"type": "string", "nullable": True},
        details={"allOf": [ref("StreamDetails")], "nullable": True},
    ),
    "SimpleToken": obj(["id", "text", "start", "stop"], id=_INT, text=_STR, start=_INT, stop=_INT),
    "TokenizeResponse": {"type": "array", "items": ref("SimpleToken")},
    "Info": obj(
        [
            "model_id",
            "max_concurrent_requests",
            "max_best_of",
            "max_stop_sequences",
            "max_input_tokens",
            "max_total_tokens",
            "validation_workers",
            "max_client_batch_size",
            "router",
            "version",
        ],
        model_id=_STR,
        model_sha={"type": "string", "nullable": True},
        model_pipeline_tag={"type": "string", "nullable": True},
        max_concurrent_requests=_INT,
        max_best_of=_INT,
        max_stop_sequences=_INT,
        max_input_tokens=_INT,
        max_total_tokens=_INT,
        validation_workers=_INT,
        max_client_batch_size=_INT,
        router=_STR,
        version=_STR,
        sha={"type": "string", "nullable": True},
        docker_label={"type": "string", "nullable": True},
    ),
}


def _errors(*codes: int, media: str = "application/json") -> dict:
    names = {
        413: "Payload too large",
        422: "Input validation error",
        424: "Generation error",
        429: "Model is overloaded",
        500: "Incomplete generation",
        503: "Unhealthy",
    }
    return {str(c): {"description": names[c], "content": {media: {"schema": ref("ErrorResponse")}}} for c in codes}


def _op(summary: str, body: str | None, ok: dict, *errors: int, tag: str = "Text Generation Inference") -> dict:
    op: dict = {"tags": [tag], "summary": summary, "responses": {"200": ok, **_errors(*errors)}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(body)}}}
    return op


def _content(schema: str, media: str = "application/json") -> dict:
    return {"description": "OK", "content": {media: {"schema": ref(schema)}}}


GEN_ERRORS = (413, 422, 424, 429, 500)
OPERATIONS: dict[str, dict[str, dict]] = {
    "/": {
        "post": _op(
            "Generate (stream false) or stream tokens (stream true)",
            "CompatGenerateRequest",
            {
                "description": "A one-element list of GenerateResponse, or SSE StreamResponse events",
                "content": {
                    "application/json": {"schema": {"type": "array", "items": ref("GenerateResponse")}},
                    "text/event-stream": {"schema": ref("StreamResponse")},
                },
            },
            *GEN_ERRORS,
        ),
        "get": _op("Health check", None, {"description": "Healthy"}, 503),
    },
    "/generate": {"post": _op("Generate tokens", "GenerateRequest", _content("GenerateResponse"), *GEN_ERRORS)},
    "/generate_stream": {
        "post": _op(
            "Stream tokens as Server-Sent Events",
            "GenerateRequest",
            _content("StreamResponse", "text/event-stream"),
            *GEN_ERRORS,
        )
    },
    "/invocations": {
        "post": _op(
            "SageMaker: a TGI, chat or completion body, answered in kind",
            None,
            {"description": "The answer of the route the body's shape selects"},
            *GEN_ERRORS,
        )
    },
    "/info": {"get": _op("Model and router information", None, _content("Info"))},
    "/health": {"get": _op("200 when every shard answers", None, {"description": "Healthy"}, 503)},
    "/ping": {"get": _op("SageMaker health check", None, {"description": "Healthy"}, 503)},
    "/metrics": {
        "get": _op(
            "Prometheus metrics",
            None,
            {"description": "Prometheus text format", "content": {"text/plain": {"schema": _STR}}},
        )
    },
    "/tokenize": {"post": _op("Tokenize inputs", "GenerateRequest", _content("TokenizeResponse"), 413, 422)},
}


def register_all() -> None:
    """Add TGI's operations and schemas to the document (idempotent)."""
    for path, ops in OPERATIONS.items():
        for method, operation in ops.items():
            openapi.register(path, method, operation, SCHEMAS)
