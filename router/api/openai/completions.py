"""POST /v1/completions: OpenAI's (legacy) completions on the one internal request.

One request per prompt and per `n` (choice index = prompt index × n + j);
`best_of` runs that many sampled sequences per choice and keeps the best
(Infer.generate). `suffix` is served through the tokenizer's fill-in-the-
middle tokens when it has them, and is a 422 otherwise. `echo` puts the
prompt before the completion (and, with `logprobs`, the prompt's logprobs).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember.router.api.openai.common import (
    FINISH,
    Choices,
    StopHolder,
    choice_count,
    completion_id,
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
    text_frame,
    trim_stop,
    usage,
)
from ember.router.errors import BodyError, EmberError, ValidationError
from ember.router.http import EventStream, read_json
from ember.router.infer import Result, TokenInfo
from ember.router.models import body_model, model_state
from ember.router.types import GenerateRequest

if TYPE_CHECKING:
    from ember.router.app import AppState

FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


def _prompts(body: dict, state: AppState) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BodyError("prompt: expected a string or a non-empty list of strings")
    if len(prompts) > state.limits.max_client_batch_size:
        raise ValidationError(
            f"Number of prompts must be <= {state.limits.max_client_batch_size}. Given: {len(prompts)}"
        )
    return prompts


def _with_suffix(prompts: list[str], suffix: str | None, state: AppState) -> list[str]:
    """Fill-in-the-middle prompts, when the tokenizer has FIM tokens."""
    if not suffix:
        return prompts
    vocab = state.tokenizer.backend.tok.get_vocab()
    if not all(t in vocab for t in FIM):
        raise ValidationError("`suffix` is not supported: this model's tokenizer has no fill-in-the-middle tokens")
    pre, suf, mid = FIM
    return [f"{pre}{p}{suf}{suffix}{mid}" for p in prompts]


class _Call:
    """A parsed completion request."""

    def __init__(self, body: Any, state: AppState) -> None:
        if not isinstance(body, dict):
            raise BodyError("expected a JSON object")
        self.prompts = _prompts(body, state)
        self.params = sampling(body, 16)
        self.n = choice_count(body, state)
        best_of = field(body, "best_of", (int,))
        if best_of is not None:
            if best_of < self.n:
                raise ValidationError(f"`best_of` must be >= `n`. Given: {best_of} and {self.n}")
            self.params.best_of = best_of
        self.echo = field(body, "echo", (bool,), False)
        self.logprobs = field(body, "logprobs", (int,))
        if self.logprobs is not None:
            self.params.top_n_tokens = self.logprobs or None
            self.params.decoder_input_details = self.echo
        self.stream = field(body, "stream", (bool,), False)
        self.include_usage = stream_options(body) if self.stream else False
        self.inputs = _with_suffix(self.prompts, field(body, "suffix", (str,)), state)

    def prompt_of(self, choice: int) -> str:
        return self.prompts[choice // self.n]


def _logprobs(tokens: list[TokenInfo], tops: list[list[TokenInfo]], offset: int) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, top in zip(tokens, tops):
        out["tokens"].append(token.text)
        out["token_logprobs"].append(token.logprob)
        out["top_logprobs"].append({t.text: t.logprob for t in top} if top else None)
        out["text_offset"].append(offset)
        offset += len(token.text)
    return out


def _choice(call: _Call, i: int, res: Result) -> dict:
    prompt = call.prompt_of(i) if call.echo else ""
    text = prompt + trim_stop(res.text, call.params.stop)
    logprobs = None
    if call.logprobs is not None:
        tokens, tops = res.tokens, res.top_tokens
        if call.echo:
            tokens, tops = [*res.prefill, *tokens], [[] for _ in res.prefill] + tops
        logprobs = _logprobs(tokens, tops, 0)
    return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": FINISH.get(res.finish_reason, "stop")}


async def handle_body(request: Request, body: Any, arrived: float) -> Response:
    state: AppState = await model_state(request, body_model(body))
    call = _Call(body, state)
    reqs = [GenerateRequest(text, call.params) for text in call.inputs]
    choices = Choices(state)
    valids = await choices.validate(reqs, call.n, call.stream)
    if call.stream:
        choices.submit(valids, arrived, request_tag(request))
        return EventStream(_events(state, choices, call, [v.input_length for v in valids]), choices.close)
    results = await choices.generate(request, valids, arrived)
    prompt_tokens = sum(v.input_length for v in valids[:: call.n])
    return JSONResponse(
        {
            "id": completion_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": state.model_id,
            "system_fingerprint": fingerprint(state),
            "choices": [_choice(call, i, r) for i, r in enumerate(results)],
            "usage": usage(
                prompt_tokens,
                sum(r.generated_tokens for r in results),
                sum(r.cached_tokens for r in results[:: call.n]),
            ),
        }
    )


async def _events(state: AppState, choices: Choices, call: _Call, lengths: list[int]) -> AsyncIterator[bytes]:
    head = {
        "id": completion_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": state.model_id,
        "system_fingerprint": fingerprint(state),
    }

    frame_head = sse_head(head)

    def chunk(i: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> bytes:
        if finish is None and logprobs is None:
            return text_frame(frame_head, i, text)
        return sse({**head, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    holders = [StopHolder(call.params.stop) for _ in lengths]
    seen: list[list[str]] = [[] for _ in lengths]  # the pieces streamed, joined at the end
    offsets = [0 for _ in lengths]
    generated = 0
    try:
        if call.echo:
            for i in range(len(lengths)):
                offsets[i] = len(call.prompt_of(i))
                yield chunk(i, call.prompt_of(i))
        async for i, item in merged(state, choices.streams):
            piece = "" if item.token.special else item.token.text
            seen[i].append(piece)
            text = holders[i].push(piece)
            logprobs = None
            if call.logprobs is not None:
                logprobs = _logprobs([item.token], [item.top_tokens], offsets[i])
                offsets[i] += len(item.token.text)
            if text or logprobs:
                yield chunk(i, text, logprobs=logprobs)
            if item.end is not None:
                generated += item.end.generated_tokens
                full, sent = item.end.text, "".join(seen[i])
                rest = holders[i].push(full[len(sent) :] if full.startswith(sent) else "", final=True)
                yield chunk(i, rest, FINISH.get(item.end.finish_reason, "stop"))
        if call.include_usage:
            prompt_tokens = sum(lengths[:: call.n])
            cached = sum(s.cached_tokens for s in choices.streams[:: call.n])
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, generated, cached)})
    except EmberError as exc:
        yield stream_error(exc)
    yield sse("[DONE]")


async def completions(request: Request) -> Response:
    state: AppState = request.app.state.ember
    arrived = time.monotonic()
    try:
        return await handle_body(request, await read_json(request, state.payload_limit), arrived)
    except EmberError as exc:
        return openai_error(exc)
