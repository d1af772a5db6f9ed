"""TGI's native routes: /generate, /generate_stream, / (compat) and /invocations.

Thin translation: the body becomes a GenerateRequest, Infer runs it, and the
Result / StreamItems become TGI's GenerateResponse / StreamResponse JSON.
Errors known before the stream starts are real HTTP statuses (422, 429).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from json.encoder import encode_basestring as json_str
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ember.router.errors import BodyError, EmberError, ValidationError, error_response
from ember.router.http import EventStream, read_json, unless_disconnected
from ember.router.infer import Result, Stream, TokenInfo
from ember.router.models import model_state
from ember.router.types import GenerateRequest, request_from_tgi

if TYPE_CHECKING:
    from ember.router.app import AppState


def _prefill(tokens: list[TokenInfo]) -> list[dict]:
    return [{"id": t.id, "text": t.text, "logprob": t.logprob} for t in tokens]


def _sequence(res: Result, prefix: str) -> dict:
    """The fields Details and BestOfSequence share."""
    seq = {
        "generated_text": prefix + res.text,
        "finish_reason": res.finish_reason,
        "generated_tokens": res.generated_tokens,
        "seed": res.seed,
        "prefill": _prefill(res.prefill),
        "tokens": [t.to_dict() for t in res.tokens],
    }
    if res.request.top_n_tokens:
        seq["top_tokens"] = [[t.to_dict() for t in top] for top in res.top_tokens]
    return seq


def generate_body(best: Result, others: list[Result]) -> dict:
    """TGI's GenerateResponse."""
    req = best.request
    prefix = req.inputs if req.return_full_text else ""
    body: dict = {"generated_text": prefix + best.text}
    if req.details:
        details = _sequence(best, prefix)
        del details["generated_text"]
        if others:
            details["best_of_sequences"] = [_sequence(r, prefix) for r in others if r is not best]
        body["details"] = details
    return body


def timing_headers(res: Result, compute_type: str) -> dict[str, str]:
    t = res.timing

    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        "x-compute-type": compute_type,
        "x-compute-time": f"{t.total:.6f}",
        "x-compute-characters": str(len(res.request.inputs)),
        "x-total-time": ms(t.total),
        "x-validation-time": ms(t.validation),
        "x-queue-time": ms(t.queue),
        "x-inference-time": ms(t.inference),
        "x-time-per-token": ms(t.per_token),
        "x-prompt-tokens": str(res.request.input_length),
        "x-generated-tokens": str(res.generated_tokens),
    }


def _frame(obj: dict) -> bytes:
    return b"data:" + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _token_frame(index: int, token: TokenInfo) -> bytes | None:
    """`_frame` of a token event without top tokens nor end, built directly (one per streamed token);
    None for a logprob JSON writes specially (inf, nan), which `_frame` handles."""
    lp = token.logprob
    if lp is None:
        logprob = "null"
    elif -math.inf < lp < math.inf:
        logprob = float.__repr__(lp)
    else:
        return None
    return (
        f'data:{{"index": {index}, "token": {{"id": {int(token.id)}, "text": {json_str(token.text)}, '
        f'"logprob": {logprob}, "special": {"true" if token.special else "false"}}}, '
        f'"generated_text": null, "details": null}}\n\n'
    ).encode()


async def tgi_events(state: AppState, stream: Stream) -> AsyncIterator[bytes]:
    """StreamResponse events; a failure after the first byte is an error event."""
    req = stream.entry.request
    prefix = req.inputs if req.return_full_text else ""
    try:
        async for item in state.infer.items(stream):
            if item.end is None and not item.top_tokens:
                frame = _token_frame(item.index, item.token)
                if frame is not None:
                    yield frame
                    continue
            event: dict = {"index": item.index, "token": item.token.to_dict()}
            if item.top_tokens:
                event["top_tokens"] = [t.to_dict() for t in item.top_tokens]
            end = item.end
            if end is None:
                event["generated_text"] = None
                event["details"] = None
            else:
                event["generated_text"] = prefix + end.text
                event["details"] = (
                    {
                        "finish_reason": end.finish_reason,
                        "generated_tokens": end.generated_tokens,
                        "seed": end.seed,
                        "input_length": req.input_length,
                    }
                    if req.details
                    else None
                )
            yield _frame(event)
    except EmberError as exc:
        yield _frame(exc.body())


async def run_generate(
    request: Request, state: AppState, req: GenerateRequest, arrived: float, as_list: bool = False
) -> Response:
    """A non-streaming generation (permit → validation → batcher → JSON), on the default model."""
    state = await model_state(request)
    permit = state.infer.acquire()
    try:
        valid = await state.infer.validate(req, stream=False)
        best, others = await unless_disconnected(request, state.infer.generate(valid, arrived, _tag(request)))
    finally:
        permit.release()
    body = generate_body(best, others)
    return JSONResponse([body] if as_list else body, headers=timing_headers(best, state.compute_type))


def _tag(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


async def run_stream(request: Request, state: AppState, req: GenerateRequest, arrived: float) -> Response:
    """A streaming generation on the default model: 429/422 are raised here, before any byte is sent."""
    state = await model_state(request)
    permit = state.infer.acquire()
    try:
        valid = await state.infer.validate(req, stream=True)
    except BaseException:
        permit.release()
        raise
    stream = state.infer.submit(valid, arrived, _tag(request))

    def on_close() -> None:
        state.infer.batcher.cancel(stream.entry)
        permit.release()

    return EventStream(tgi_events(state, stream), on_close)


async def generate(request: Request) -> Response:
    state: AppState = request.app.state.ember
    arrived = time.monotonic()
    try:
        req = request_from_tgi(await read_json(request, state.payload_limit))
        return await run_generate(request, state, req, arrived)
    except EmberError as exc:
        return error_response(exc)


async def generate_stream(request: Request) -> Response:
    state: AppState = request.app.state.ember
    arrived = time.monotonic()
    try:
        req = request_from_tgi(await read_json(request, state.payload_limit))
        return await run_stream(request, state, req, arrived)
    except EmberError as exc:
        return error_response(exc)


async def compat_body(request: Request, state: AppState, body: dict, arrived: float) -> Response:
    req = request_from_tgi(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BodyError("stream: invalid type, expected a boolean")
    if stream:
        return await run_stream(request, state, req, arrived)
    return await run_generate(request, state, req, arrived, as_list=True)


async def compat_generate(request: Request) -> Response:
    """POST /: `stream` picks /generate (as a one-element list) or /generate_stream."""
    state: AppState = request.app.state.ember
    arrived = time.monotonic()
    try:
        return await compat_body(request, state, await read_json(request, state.payload_limit), arrived)
    except EmberError as exc:
        return error_response(exc)


async def invocations(request: Request) -> Response:
    """SageMaker: `inputs` → TGI, `messages` → chat, `prompt` → completion, by shape."""
    state: AppState = request.app.state.ember
    arrived = time.monotonic()
    try:
        body = await read_json(request, state.payload_limit)
        if not isinstance(body, dict):
            raise BodyError("expected a JSON object")
        if "inputs" in body:
            return await compat_body(request, state, body, arrived)
        for shape in ("messages", "prompt"):
            if shape in body:
                handler = state.invocation_handlers.get(shape)
                if handler is None:
                    raise ValidationError(f"bodies with `{shape}` are not served on this server yet")
                return await handler(request, body, arrived)
        raise BodyError("expected one of `inputs`, `messages` or `prompt`")
    except EmberError as exc:
        return error_response(exc)


ROUTES = [
    Route("/generate", generate, methods=["POST"]),
    Route("/generate_stream", generate_stream, methods=["POST"]),
    Route("/", compat_generate, methods=["POST"]),
    Route("/invocations", invocations, methods=["POST"]),
]
