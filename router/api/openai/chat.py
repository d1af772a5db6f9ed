"""POST /v1/chat/completions and /chat_tokenize: OpenAI's chat on the one internal request.

The messages go through the model's chat template (`ember.router.chat_template`) into
a prompt; the sampling fields, `response_format` and `tools` become a
`GenerateRequest` (a grammar for the last two); `n` choices run as n
requests. Answers are OpenAI's `chat.completion` or `chat.completion.chunk`
stream, with tool calls parsed (`tools.py`) into `tool_calls`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember.router.api.openai import tools as tool_calls
from ember.router.api.openai.common import (
    FINISH,
    Choices,
    StopHolder,
    choice_count,
    completion_id,
    content_frame,
    field,
    fingerprint,
    merged,
    now,
    openai_error,
    request_tag,
    sampling,
    sse,
    sse_head,
    stream_error,
    stream_options,
    trim_stop,
    usage,
)
from ember.router.api.openai.tools import ToolError, ToolPlan
from ember.router.chat_template import ChatTemplate
from ember.router.errors import BodyError, EmberError
from ember.router.http import EventStream, read_json
from ember.router.infer import Result, StreamItem, TokenInfo
from ember.router.models import body_model, model_state
from ember.router.types import GenerateParameters, GenerateRequest, Grammar, parse_grammar
from ember.router.validation import ValidRequest

if TYPE_CHECKING:
    from ember.router.app import AppState

ROLES = {"system", "user", "assistant", "tool", "developer"}


def _text(content: Any, where: str) -> str:
    """Message content: a string, or parts (text kept, images as markdown links), or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BodyError(f"{where}.content: expected a string or a list of parts")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            out.append(f"![]({url.get('url') if isinstance(url, dict) else url})")
        else:
            raise BodyError(f"{where}.content: unsupported part {part!r}")
    return "".join(out)


def _call_text(call: dict) -> str:
    """A past tool call written as the model is asked to write one."""
    fn = call.get("function")
    fn = fn if isinstance(fn, dict) else {}
    return f'{{"name": "{fn.get("name")}", "arguments": {fn.get("arguments")}}}'


def _message(raw: Any, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(raw, dict) or raw.get("role") not in ROLES:
        raise BodyError(f"{where}: expected an object with a role in {sorted(ROLES)}")
    msg = {"role": "system" if raw["role"] == "developer" else raw["role"], "content": _text(raw.get("content"), where)}
    for key in ("name", "tool_call_id"):
        if isinstance(raw.get(key), str):
            msg[key] = raw[key]
    calls = raw.get("tool_calls")
    if isinstance(calls, list) and calls:
        msg["tool_calls"] = calls
        if not msg["content"]:  # templates that know nothing of tool_calls still show the call
            msg["content"] = "".join(_call_text(c) for c in calls if isinstance(c, dict))
    return msg


def _response_format(value: Any) -> Grammar | None:
    """OpenAI's text / json_object / json_schema, and TGI's json / regex grammar shapes."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BodyError("response_format: expected an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar("json", value.get("value") or value.get("schema") or {"type": "object"})
    if kind == "json_schema":
        spec = value.get("json_schema") or value.get("value")
        schema = spec.get("schema") if isinstance(spec, dict) and "schema" in spec else spec
        if not isinstance(schema, (dict, str)):
            raise BodyError("response_format.json_schema.schema: expected a JSON schema")
        return Grammar("json", schema)
    if kind in ("json", "regex"):
        return parse_grammar(value)
    raise BodyError(f"response_format.type: unknown type {kind!r}")


@dataclass
class ChatCall:
    """A parsed chat request: what to render, how to run it, how to answer."""

    messages: list[dict]
    params: GenerateParameters
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    plan: ToolPlan | None
    raw_tools: list | None


async def parse_chat_off_loop(body: Any, state: AppState) -> ChatCall:
    """`parse_chat`, in a worker thread when tools are given: their schemas are checked and
    compiled to a regex, which for large schemas would stall every stream on the event loop."""
    if isinstance(body, dict) and body.get("tools"):
        return await asyncio.to_thread(parse_chat, body, state)
    return parse_chat(body, state)


def parse_chat(body: Any, state: AppState) -> ChatCall:
    if not isinstance(body, dict):
        raise BodyError("expected a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BodyError("messages: expected a non-empty list")
    messages = [_message(m, i) for i, m in enumerate(raw)]
    params = sampling(body, None)
    logprobs = field(body, "logprobs", (bool,), False)
    top = field(body, "top_logprobs", (int,))
    if top is not None and not logprobs:
        raise BodyError("top_logprobs requires logprobs: true")
    params.top_n_tokens = top or None
    grammar = _response_format(body.get("response_format"))
    plan = None
    raw_tools = body.get("tools")
    if raw_tools:
        if grammar is not None:
            raise ToolError("Grammar and tools are mutually exclusive")
        plan = tool_calls.plan(raw_tools, body.get("tool_choice"), body.get("tool_prompt"))
        grammar = plan.grammar
    params.grammar = grammar
    stream = field(body, "stream", (bool,), False)
    return ChatCall(
        messages,
        params,
        choice_count(body, state),
        stream,
        stream_options(body) if stream else False,
        logprobs,
        plan,
        raw_tools if plan else None,
    )


def _token_logprob(token: TokenInfo, top: list[TokenInfo]) -> dict:
    return {
        "token": token.text,
        "logprob": token.logprob,
        "bytes": list(token.text.encode()),
        "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())} for t in top],
    }


class ChatApi:
    """The chat routes of one model (its template)."""

    def __init__(self, template: ChatTemplate) -> None:
        self.template = template

    async def prompt(self, state: AppState, call: ChatCall) -> str:
        messages = call.messages
        plan = call.plan
        template = state.chat_template or self.template
        target = state.target
        if target is not None and target.system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": target.system}, *messages]  # a derived model's own
        if plan is not None and plan.grammar is not None and not template.mentions_tools:
            last = messages[-1]
            listing = tool_calls.tool_text(plan.tools, plan.prompt)
            messages = [*messages[:-1], {**last, "content": last["content"] + listing}]
        return await state.tokenizer.run(lambda: template.render(messages, tools=call.raw_tools))

    async def completions(self, request: Request) -> Response:
        state: AppState = request.app.state.ember
        arrived = time.monotonic()
        try:
            return await self.handle_body(request, await read_json(request, state.payload_limit), arrived)
        except EmberError as exc:
            return openai_error(exc)

    async def handle_body(self, request: Request, body: Any, arrived: float) -> Response:
        state: AppState = await model_state(request, body_model(body))
        call = await parse_chat_off_loop(body, state)
        req = GenerateRequest(await self.prompt(state, call), call.params, add_special_tokens=False)
        choices = Choices(state)
        valids = await choices.validate([req], call.n, call.stream)
        if call.stream:
            choices.submit(valids, arrived, request_tag(request))
            return EventStream(self._events(state, choices, call, valids), choices.close)
        results = await choices.generate(request, valids, arrived)
        return JSONResponse(self._answer(state, call, results))

    def _choice(self, call: ChatCall, i: int, res: Result) -> dict:
        finish = FINISH.get(res.finish_reason, "stop")
        message: dict = {"role": "assistant", "content": trim_stop(res.text, call.params.stop)}
        plan = call.plan
        if (
            plan is not None
            and plan.grammar is not None
            and finish != "length"
            and tool_calls.is_call(res.text, plan.required)
        ):
            try:
                message = {"role": "assistant", "content": None, "tool_calls": [tool_calls.parse_call(res.text)]}
                finish = "tool_calls"
            except ToolError:  # cut short (a stop sequence): answer the text as it is
                pass
        logprobs = (
            {"content": [_token_logprob(t, top) for t, top in zip(res.tokens, res.top_tokens) if not t.special]}
            if call.logprobs
            else None
        )
        return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def _answer(self, state: AppState, call: ChatCall, results: list[Result]) -> dict:
        return {
            "id": completion_id("chatcmpl"),
            "object": "chat.completion",
            "created": now(),
            "model": state.model_id,
            "system_fingerprint": fingerprint(state),
            "choices": [self._choice(call, i, r) for i, r in enumerate(results)],
            "usage": usage(
                results[0].request.input_length, sum(r.generated_tokens for r in results), results[0].cached_tokens
            ),
        }

    async def _events(
        self, state: AppState, choices: Choices, call: ChatCall, valids: list[ValidRequest]
    ) -> AsyncIterator[bytes]:
        head = {
            "id": completion_id("chatcmpl"),
            "object": "chat.completion.chunk",
            "created": now(),
            "model": state.model_id,
            "system_fingerprint": fingerprint(state),
        }
        writers = [_ChoiceWriter(call, i) for i in range(len(valids))]

        frame_head = sse_head(head)

        def chunk(i: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> bytes:
            if finish is None and logprobs is None and len(delta) == 1 and type(delta.get("content")) is str:
                return content_frame(frame_head, i, delta["content"])
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return sse({**head, "choices": [choice], "usage": None})

        generated = 0
        try:
            for i in range(len(valids)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, item in merged(state, choices.streams):
                w = writers[i]
                for delta in w.push(item):
                    yield chunk(i, delta)
                if call.logprobs and not item.token.special:
                    yield chunk(i, {}, logprobs={"content": [_token_logprob(item.token, item.top_tokens)]})
                if item.end is not None:
                    generated += item.end.generated_tokens
                    for delta in w.finish(item.end.text):
                        yield chunk(i, delta)
                    yield chunk(i, {}, w.finish_reason(item.end.finish_reason))
            if call.include_usage:
                cached = choices.streams[0].cached_tokens
                yield sse({**head, "choices": [], "usage": usage(valids[0].input_length, generated, cached)})
        except EmberError as exc:
            yield stream_error(exc)
        yield sse("[DONE]")

    async def tokenize(self, request: Request) -> Response:
        """TGI's /chat_tokenize: the templated text and its tokens."""
        state: AppState = request.app.state.ember
        try:
            body = await read_json(request, state.payload_limit)
            state = await model_state(request, body_model(body))
            call = await parse_chat_off_loop(body, state)
            text = await self.prompt(state, call)
            enc = await state.tokenizer.encode(text, False)
        except EmberError as exc:
            return openai_error(exc)
        tokens = [{"id": i, "text": text[a:b], "start": a, "stop": b} for i, (a, b) in zip(enc.ids, enc.offsets)]
        return JSONResponse({"tokenize_response": tokens, "templated_text": text})


class _ChoiceWriter:
    """One streamed choice: text deltas with stop sequences held back, or tool-call deltas."""

    def __init__(self, call: ChatCall, index: int) -> None:
        self.plan = call.plan if call.plan is not None and call.plan.grammar is not None else None
        self.text = StopHolder(call.params.stop)
        self.caller: tool_calls.CallStreamer | None = None
        self.seen: list[str] = []  # the token texts pushed, joined at the end
        self.undecided = ""

    def push(self, item: StreamItem) -> list[dict]:
        if item.token.special:
            return []
        self.seen.append(item.token.text)
        return self._route(item.token.text, False)

    def finish(self, full_text: str) -> list[dict]:
        seen = "".join(self.seen)
        rest = full_text[len(seen) :] if full_text.startswith(seen) else ""
        self.seen = [seen, rest]
        return self._route(rest, True)

    def _route(self, piece: str, final: bool) -> list[dict]:
        if self.plan is not None and self.caller is None and self.undecided is not None:
            self.undecided += piece
            if not self.undecided.strip() and not final:
                return []
            piece, self.undecided = self.undecided, None
            if tool_calls.is_call(piece, self.plan.required):
                self.caller = tool_calls.CallStreamer()
        if self.caller is not None:
            return [{"tool_calls": [d]} for d in self.caller.push(piece)]
        out = self.text.push(piece, final)
        return [{"content": out}] if out else []

    def finish_reason(self, reason: str) -> str:
        finish = FINISH.get(reason, "stop")
        if self.caller is not None and self.caller.name is not None and finish != "length":
            return "tool_calls"
        return finish
