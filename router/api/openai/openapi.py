"""The OpenAPI operations and schemas of the OpenAI routes and /chat_tokenize."""

from __future__ import annotations

from ember.router import openapi
from ember.router.openapi import obj, ref

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number", "nullable": True}


SCHEMAS = {
    "OpenAIError": obj(
        ["error"],
        error=obj(
            ["message", "type"],
            message=_STR,
            type=_STR,
            param={"type": "string", "nullable": True},
            code={"type": "integer", "nullable": True},
        ),
    ),
    "ChatMessage": obj(
        ["role"],
        role={"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        content={"oneOf": [_STR, {"type": "array", "items": {"type": "object"}}], "nullable": True},
        tool_calls={"type": "array", "items": {"type": "object"}},
        tool_call_id=_STR,
        name=_STR,
    ),
    "ChatRequest": obj(
        ["messages"],
        model=_STR,
        messages={"type": "array", "items": ref("ChatMessage")},
        max_tokens=_INT,
        max_completion_tokens=_INT,
        temperature=_NUM,
        top_p=_NUM,
        top_k=_INT,
        min_p=_NUM,
        seed=_INT,
        stop={"oneOf": [_STR, {"type": "array", "items": _STR}]},
        presence_penalty=_NUM,
        frequency_penalty=_NUM,
        repetition_penalty=_NUM,
        logit_bias={"type": "object"},
        n=_INT,
        logprobs={"type": "boolean"},
        top_logprobs=_INT,
        stream={"type": "boolean"},
        stream_options=obj([], include_usage={"type": "boolean"}),
        response_format={"type": "object", "description": "text, json_object, json_schema, or TGI's json/regex"},
        tools={"type": "array", "items": {"type": "object"}},
        tool_choice={"description": "none, auto, required, or {type: function, function: {name}}"},
        tool_prompt=_STR,
        ignore_eos={"type": "boolean"},
        min_tokens=_INT,
    ),
    "CompletionRequest": obj(
        ["prompt"],
        model=_STR,
        prompt={"oneOf": [_STR, {"type": "array", "items": _STR}]},
        suffix=_STR,
        echo={"type": "boolean"},
        logprobs=_INT,
        best_of=_INT,
        n=_INT,
        max_tokens=_INT,
        temperature=_NUM,
        top_p=_NUM,
        seed=_INT,
        stop={"oneOf": [_STR, {"type": "array", "items": _STR}]},
        stream={"type": "boolean"},
        ignore_eos={"type": "boolean"},
        min_tokens=_INT,
    ),
    "EmbeddingRequest": obj(
        ["input"],
        model=_STR,
        input={
            "oneOf": [
                _STR,
                {"type": "array", "items": _STR},
                {"type": "array", "items": _INT},
                {"type": "array", "items": {"type": "array", "items": _INT}},
            ]
        },
        encoding_format={"type": "string", "enum": ["float", "base64"]},
        dimensions=_INT,
    ),
    "Model": obj(["id", "object", "created", "owned_by"], id=_STR, object=_STR, created=_INT, owned_by=_STR),
    "ModelList": obj(["object", "data"], object=_STR, data={"type": "array", "items": ref("Model")}),
    "ChatTokenizeResponse": obj(
        ["tokenize_response", "templated_text"],
        templated_text=_STR,
        tokenize_response={"type": "array", "items": ref("SimpleToken")},
    ),
}


def _op(summary: str, body: str | None, ok_schema: dict, *errors: int, tag: str = "OpenAI") -> dict:
    responses: dict = {"200": {"description": "OK", "content": {"application/json": {"schema": ok_schema}}}}
    for code in errors:
        error = {"application/json": {"schema": ref("OpenAIError")}}
        responses[str(code)] = {"description": "Error", "content": error}
    op: dict = {"tags": [tag], "summary": summary, "responses": responses}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(body)}}}
    return op


GEN = (413, 422, 424, 429)


def register_all() -> None:
    openapi.register(
        "/v1/chat/completions",
        "post",
        _op(
            "Chat completion (SSE chat.completion.chunk events when stream is true)",
            "ChatRequest",
            {"type": "object"},
            *GEN,
        ),
        SCHEMAS,
    )
    openapi.register(
        "/v1/completions",
        "post",
        _op(
            "Text completion (SSE text_completion events when stream is true)",
            "CompletionRequest",
            {"type": "object"},
            *GEN,
        ),
    )
    openapi.register("/v1/models", "get", _op("The served model", None, ref("ModelList")))
    openapi.register(
        "/v1/models/{model_id}", "get", _op("One model (404 unless it is the served one)", None, ref("Model"), 404)
    )
    openapi.register(
        "/v1/embeddings",
        "post",
        _op("Embeddings (mean-pooled, L2-normalised)", "EmbeddingRequest", {"type": "object"}, 413, 422, 424, 429),
    )
    openapi.register(
        "/chat_tokenize",
        "post",
        _op(
            "Template and tokenize a chat request",
            "ChatRequest",
            ref("ChatTokenizeResponse"),
            413,
            422,
            tag="Text Generation Inference",
        ),
    )
