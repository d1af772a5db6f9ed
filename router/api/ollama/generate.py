"""Ollama's generation routes: /api/generate, /api/chat, /api/embed and /api/embeddings.

Each body becomes the one internal `GenerateRequest` and runs through `Infer` (queue, batching,
cancellation when the client leaves, grammars: all the engine's); this module only translates.

Decisions where Ollama's behaviour cannot be matched exactly:
- `context` (token ids from an earlier answer) comes before the new prompt as those very ids
  (`GenerateRequest.prefix_ids`), so an exchange continues exactly where it stopped;
- `template` takes the `{{ .System }}`, `{{ .Prompt }}` and `{{ .Response }}` placeholders by
  substitution; any other Go-template action is a 400;
- `repeat_penalty`, `presence_penalty` and `frequency_penalty` count the last `repeat_last_n`
  tokens of prompt and answer together, as llama.cpp counts them (0 turns them off, -1 is the
  context); Ember's other routes keep TGI's and OpenAI's rules;
- with no `options`, Ollama's sampling defaults apply (temperature 0.8, top_k 40, top_p 0.9,
  repeat_penalty 1.1 over the last 64 tokens), under a derived model's own `parameters`, under
  the request's options;
- `num_ctx` cannot resize a loaded model: larger than the model's context is a 400, smaller
  bounds the prompt plus the answer;
- `tools` are served by Ember's tool grammar (one call or a text answer, the model's first token
  decides); `tool_choice` (`"required"` or a function name) is an Ember extension, Ollama has none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ember.router import tools as core_tools
from ember.router.api.ollama import common
from ember.router.errors import BodyError, EmberError, IncompleteGeneration, ValidationError
from ember.router.http import unless_disconnected
from ember.router.infer import Permit, Stream
from ember.router.models import ModelUnavailable
from ember.router.stops import StopHolder, trim_stop
from ember.router.types import GenerateParameters, GenerateRequest, Grammar

if TYPE_CHECKING:
    from ember.router.app import AppState

log = logging.getLogger("ember.router.api.ollama")

FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
DONE_REASON = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 64}
ROLES = ("system", "user", "assistant", "tool")

# ---- body fields ----------------------------------------------------------------------------------


def _typed(body: dict, name: str, kinds: tuple[type, ...], where: str = "") -> Any:
    """An optional field of the given JSON type (null is absent; a boolean is never a number)."""
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise BodyError(f"{where}{name}: invalid type {type(value).__name__}, expected {kinds[0].__name__}")
    return value


async def _generation_body(request: Request) -> tuple[dict, str, bool]:
    """A generation route's body, its model's name and its stream flag; images and thinking refused."""
    body = await common.body_of(request)
    name = common.model_name(body)
    _no_images_or_thinking(body, name)
    return body, name, common.stream_flag(body)


def _no_images_or_thinking(body: dict, model: str) -> None:
    if body.get("images"):
        raise ValidationError(f"model '{model}' does not support images: it has no vision")
    if body.get("think") not in (None, False):
        raise ValidationError(f'"{model}" does not support thinking')


def _format_grammar(value: Any) -> Grammar | None:
    """`format`: "json" (any object) or a JSON schema, as OpenAI's json_schema response_format."""
    if value in (None, ""):
        return None
    if value == "json":
        return Grammar("json", {"type": "object"})
    if isinstance(value, dict):
        return Grammar("json", value)
    raise BodyError('format: expected "json" or a JSON schema object')


# option name -> (GenerateParameters field, accepted JSON types)
_OPTIONS: dict[str, tuple[str, tuple[type, ...]]] = {
    "temperature": ("temperature", (int, float)),
    "top_k": ("top_k", (int,)),
    "top_p": ("top_p", (int, float)),
    "min_p": ("min_p", (int, float)),
    "typical_p": ("typical_p", (int, float)),
    "repeat_penalty": ("repetition_penalty", (int, float)),
    "presence_penalty": ("presence_penalty", (int, float)),
    "frequency_penalty": ("frequency_penalty", (int, float)),
}
_ACCEPTED = {"num_predict", "seed", "stop", "num_ctx", "repeat_last_n"}


@dataclass
class Options:
    """A request's options over the model's and Ollama's defaults, as Ember parameters."""

    params: GenerateParameters
    num_predict: int | None = None
    num_ctx: int | None = None


def _merged_options(body: dict, state: AppState) -> dict:
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise BodyError("options: expected an object")
    own = state.target.parameters if state.target is not None else {}
    return {**OLLAMA_DEFAULTS, **(own or {}), **(options or {})}


def options_of(body: dict, state: AppState) -> Options:
    merged = _merged_options(body, state)
    p = GenerateParameters(details=True)
    for name, value in merged.items():
        if name in _OPTIONS:
            attr, kinds = _OPTIONS[name]
            value = _typed(merged, name, kinds, "options.")
            if value is not None:
                setattr(p, attr, float(value) if float in kinds else value)
        elif name not in _ACCEPTED:
            log.debug("ignoring Ollama option %s", name)
    if p.top_k is not None and p.top_k <= 0:
        p.top_k = None  # Ollama: 0 turns top_k off
    if p.top_p is not None and p.top_p >= 1.0:
        p.top_p = None
    if p.typical_p is not None and p.typical_p >= 1.0:
        p.typical_p = None
    if p.temperature is not None and p.temperature <= 0:  # greedy: the warpers do not matter
        p.temperature = p.top_k = p.top_p = p.typical_p = p.min_p = None
    else:
        p.do_sample = True
    seed = _typed(merged, "seed", (int,), "options.")
    p.seed = seed if seed is not None and seed >= 0 else None
    stop = merged.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BodyError("options.stop: expected a list of strings")
    p.stop = list(stop or [])
    opts = Options(p, _typed(merged, "num_predict", (int,), "options."), _typed(merged, "num_ctx", (int,), "options."))
    _check_num_ctx(opts.num_ctx, state)
    _penalty_window(p, _typed(merged, "repeat_last_n", (int,), "options."), opts.num_ctx or _context_length(state))
    return opts


def _penalty_window(p: GenerateParameters, last_n: int | None, context: int) -> None:
    """repeat_last_n as llama.cpp reads it: the window the penalties count; 0 = none, -1 = the context."""
    if last_n is None or last_n == -1:
        last_n = context
    if last_n < -1:
        raise ValidationError(f"options.repeat_last_n must be -1 (the context), 0 (off) or positive. Given: {last_n}")
    if last_n == 0:
        p.repetition_penalty = p.frequency_penalty = p.presence_penalty = None
    p.penalty_window = last_n


def _context_length(state: AppState) -> int:
    return int(state.limits.max_total_tokens)


def _check_num_ctx(num_ctx: int | None, state: AppState) -> None:
    if num_ctx is None:
        return
    most = _context_length(state)
    if num_ctx <= 0:
        raise ValidationError(f"options.num_ctx must be positive. Given: {num_ctx}")
    if num_ctx > most:
        raise ValidationError(
            f"options.num_ctx {num_ctx} is larger than this model's context length {most}: "
            "the model is not reloaded with a larger context"
        )


async def _apply_lengths(state: AppState, req: GenerateRequest, opts: Options) -> None:
    """num_predict and num_ctx as max_new_tokens (-1 and -2 and none: up to the end of the context)."""
    n = opts.num_predict
    if n is not None and n > 0:
        req.parameters.max_new_tokens = n
    if opts.num_ctx is None or opts.num_ctx >= _context_length(state):
        return
    n_input = len(req.prefix_ids) + len((await state.tokenizer.encode(req.inputs, req.add_special_tokens)).ids)
    room = opts.num_ctx - n_input
    if room <= 0:
        raise ValidationError(f"the prompt has {n_input} tokens: more than options.num_ctx {opts.num_ctx}")
    current = req.parameters.max_new_tokens
    req.parameters.max_new_tokens = room if current is None else min(current, room)


# ---- prompts --------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"{{-?\s*\.(System|Prompt|Response)\s*-?}}")


def _substitute(template: str, system: str, prompt: str) -> str:
    """Ollama's Go template, for its three common placeholders only."""
    values = {"System": system, "Prompt": prompt, "Response": ""}
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    if "{{" in text:
        raise ValidationError(
            "template: only the {{ .System }}, {{ .Prompt }} and {{ .Response }} placeholders are supported"
        )
    return text


def _template(state: AppState):
    template = state.chat_template
    if template is None or not getattr(template, "source", None):
        raise ValidationError(f"model '{state.model_id}' has no chat template: send `raw: true` or a `template`")
    return template


def _fim(state: AppState, prompt: str, suffix: str) -> str:
    backend = getattr(state.tokenizer, "backend", None)
    tok = getattr(backend, "tok", None)
    vocab = tok.get_vocab() if tok is not None else {}
    if not all(t in vocab for t in FIM):
        raise ValidationError(
            f"model '{state.model_id}' does not support insert: its tokenizer has no fill-in-the-middle tokens"
        )
    pre, suf, mid = FIM
    return f"{pre}{prompt}{suf}{suffix}{mid}"


async def generate_prompt(state: AppState, body: dict) -> tuple[str, bool, list[int]]:
    """The text /api/generate runs, whether the tokenizer adds its special tokens to it, and the token ids
    of an earlier exchange (`context`) that come before it, as they are."""
    prompt = _typed(body, "prompt", (str,)) or ""
    system = _typed(body, "system", (str,))
    template = _typed(body, "template", (str,))
    suffix = _typed(body, "suffix", (str,))
    raw = bool(_typed(body, "raw", (bool,)))
    context = body.get("context")
    if context is not None and not (
        isinstance(context, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in context)
    ):
        raise BodyError("context: expected a list of token ids")
    if system is None and state.target is not None:
        system = state.target.system
    if suffix:
        text = _fim(state, prompt, suffix)
    elif raw:
        text = prompt
    elif template:
        text = _substitute(template, system or "", prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        tpl = _template(state)
        text = await state.tokenizer.run(lambda: tpl.render(messages))
    vocab = int(state.shard_info.get("vocab_size") or 0)
    if context and vocab and not all(0 <= t < vocab for t in context):
        raise BodyError(f"context: token ids are >= 0 and < {vocab}")
    return text, raw and not context, list(context or [])


# ---- running a request and timing it --------------------------------------------------------------


@dataclass
class Run:
    """One generation's permit, stream and measured durations (nanoseconds, as Ollama reports them)."""

    state: AppState
    permit: Permit
    stream: Stream
    arrived: float
    load_s: float
    submitted: float = field(default_factory=time.monotonic)
    first: float | None = None
    ids: list[int] = field(default_factory=list)
    end: Any = None

    async def items(self) -> AsyncIterator[Any]:
        """The stream's items; records the first token's time and every generated id."""
        async for item in self.state.infer.items(self.stream):
            if self.first is None:
                self.first = time.monotonic()
            self.ids.append(item.token.id)
            if item.end is not None:
                self.end = item.end
            yield item
        if self.end is None:
            raise IncompleteGeneration()

    def close(self) -> None:
        self.state.infer.batcher.cancel(self.stream.entry)
        self.permit.release()

    def final(self) -> dict:
        now = time.monotonic()
        first = self.first or now
        end = self.end
        return {
            "done_reason": DONE_REASON.get(end.finish_reason, "stop") if end is not None else "stop",
            "total_duration": max(common.ns(now - self.arrived), 1),
            "load_duration": max(common.ns(self.load_s), 1),
            "prompt_eval_count": self.stream.entry.request.input_length,
            "prompt_eval_duration": max(common.ns(first - self.submitted), 1),
            "eval_count": end.generated_tokens if end is not None else len(self.ids),
            "eval_duration": max(common.ns(now - first), 1),
        }

    def context(self) -> list[int]:
        return [*self.stream.entry.request.input_ids, *self.ids]


async def start(state: AppState, req: GenerateRequest, stream: bool, arrived: float, load_s: float) -> Run:
    permit = state.infer.acquire()
    try:
        valid = await state.infer.validate(req, stream)
        submitted = time.monotonic()
        return Run(state, permit, state.infer.submit(valid, arrived), arrived, load_s, submitted)
    except BaseException:
        permit.release()
        raise


async def load_model(request: Request, body: dict) -> tuple[AppState, float]:
    """The request's model (loaded if needed) and the seconds spent waiting for it."""
    t0 = time.monotonic()
    state = await common.ollama_model(request, body)
    return state, time.monotonic() - t0


async def load_or_unload(request: Request, body: dict, name: str) -> dict:
    """An empty prompt: load the model, or with keep_alive 0 unload it."""
    state: AppState = request.app.state.ember
    keep_alive = common.keep_alive_of(body, 1.0)
    if keep_alive == 0:
        models = state.models
        if models is None:
            raise ModelUnavailable("this router cannot unload models")
        await models.unload(models.target(name, fallback=False))
        return {"model": name, "created_at": common.created_at(), "done": True, "done_reason": "unload"}
    await common.ollama_model(request, body)
    return {"model": name, "created_at": common.created_at(), "done": True, "done_reason": "load"}


# ---- /api/generate --------------------------------------------------------------------------------


async def generate(request: Request) -> Response:
    arrived = time.monotonic()
    try:
        body, name, stream = await _generation_body(request)
        if not _typed(body, "prompt", (str,)) and not body.get("context") and not body.get("suffix"):
            return JSONResponse({**await load_or_unload(request, body, name), "response": ""})
        state, load_s = await load_model(request, body)
        opts = options_of(body, state)
        opts.params.grammar = _format_grammar(body.get("format"))
        text, specials, context = await generate_prompt(state, body)
        req = GenerateRequest(text, opts.params, add_special_tokens=specials, prefix_ids=context)
        await _apply_lengths(state, req, opts)
        run = await start(state, req, stream, arrived, load_s)
    except EmberError as exc:
        return common.ollama_error(exc)
    if stream:
        return common.ndjson(_generate_lines(run, name), run.close)
    try:
        text = await unless_disconnected(request, _whole_text(run))
    except EmberError as exc:
        return common.ollama_error(exc)
    finally:
        run.close()
    stops = run.stream.entry.request.stopping.stop_sequences
    return JSONResponse(
        {
            "model": name,
            "created_at": common.created_at(),
            "response": trim_stop(text, list(stops)),
            "done": True,
            **run.final(),
            "context": run.context(),
        }
    )


async def _whole_text(run: Run) -> str:
    async for _ in run.items():
        pass
    return run.end.text


async def _generate_lines(run: Run, name: str) -> AsyncIterator[bytes]:
    stops = StopHolder(list(run.stream.entry.request.stopping.stop_sequences))
    seen: list[str] = []
    try:
        async for item in run.items():
            piece = "" if item.token.special else item.token.text
            seen.append(piece)
            if item.end is not None:  # the whole text may hold what the pieces could not (broken UTF-8)
                joined = "".join(seen)
                piece = piece + (item.end.text[len(joined) :] if item.end.text.startswith(joined) else "")
            out = stops.push(piece, final=item.end is not None)
            if out:
                yield common.line({"model": name, "created_at": common.created_at(), "response": out, "done": False})
        final = {"model": name, "created_at": common.created_at(), "response": "", "done": True, **run.final()}
        yield common.line({**final, "context": run.context()})
    except EmberError as exc:
        yield common.error_line(exc)


# ---- /api/chat ------------------------------------------------------------------------------------


def _message(raw: Any, i: int, model: str) -> dict:
    where = f"messages[{i}]"
    if not isinstance(raw, dict) or raw.get("role") not in ROLES:
        raise BodyError(f"{where}: expected an object with a role in {list(ROLES)}")
    content = raw.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise BodyError(f"{where}.content: expected a string")
    if raw.get("images"):
        raise ValidationError(f"model '{model}' does not support images: it has no vision")
    msg: dict = {"role": raw["role"], "content": content}
    calls = raw.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise BodyError(f"{where}.tool_calls: expected a list of calls")
        msg["tool_calls"] = calls
        if not content:  # shown as the model was asked to write it, for templates that ignore tool_calls
            msg["content"] = "".join(_call_text(c) for c in calls)
    if isinstance(raw.get("tool_name"), str):
        msg["name"] = raw["tool_name"]
    return msg


def _call_text(call: dict) -> str:
    fn = call.get("function") if isinstance(call.get("function"), dict) else {}
    return json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments", {})}, ensure_ascii=False)


@dataclass
class ChatTools:
    functions: list[dict]
    required: bool


def _tools(body: dict) -> ChatTools | None:
    if not body.get("tools"):
        return None
    functions = common.tool_functions(body["tools"])
    choice = body.get("tool_choice")  # Ember's extension
    if choice in (None, "auto"):
        return ChatTools(functions, False)
    if choice == "none":
        return None
    if choice != "required":
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else choice
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise ValidationError(f"tool_choice: no tool named {name!r}")
    return ChatTools(functions, True)


async def chat_prompt(state: AppState, messages: list[dict], tools: ChatTools | None, raw_tools: Any) -> str:
    template = _template(state)
    target = state.target
    if target is not None and target.system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": target.system}, *messages]
    if tools is not None and not template.mentions_tools:
        last = messages[-1]
        messages = [*messages[:-1], {**last, "content": last["content"] + core_tools.tool_listing(tools.functions)}]
    return await state.tokenizer.run(lambda: template.render(messages, tools=raw_tools if tools else None))


async def chat(request: Request) -> Response:
    arrived = time.monotonic()
    try:
        body, name, stream = await _generation_body(request)
        raw = body.get("messages")
        if raw is not None and not isinstance(raw, list):
            raise BodyError("messages: expected a list")
        if not raw:
            answer = await load_or_unload(request, body, name)
            return JSONResponse({**answer, "message": {"role": "assistant", "content": ""}})
        messages = [_message(m, i, name) for i, m in enumerate(raw)]
        state, load_s = await load_model(request, body)
        opts = options_of(body, state)
        grammar = _format_grammar(body.get("format"))
        tools = await asyncio.to_thread(_chat_tools, body, grammar)
        opts.params.grammar = core_tools.call_grammar(tools.functions, tools.required) if tools else grammar
        text = await chat_prompt(state, messages, tools, body.get("tools"))
        req = GenerateRequest(text, opts.params, add_special_tokens=False)
        await _apply_lengths(state, req, opts)
        run = await start(state, req, stream, arrived, load_s)
    except EmberError as exc:
        return common.ollama_error(exc)
    if stream:
        return common.ndjson(_chat_lines(run, name, tools), run.close)
    try:
        text = await unless_disconnected(request, _whole_text(run))
    except EmberError as exc:
        return common.ollama_error(exc)
    finally:
        run.close()
    stops = list(run.stream.entry.request.stopping.stop_sequences)
    message = _chat_message(text, stops, tools, run)
    return JSONResponse(
        {"model": name, "created_at": common.created_at(), "message": message, "done": True, **run.final()}
    )


def _chat_tools(body: dict, grammar: Grammar | None) -> ChatTools | None:
    """Checked off the event loop: large tool schemas take a while to compile."""
    tools = _tools(body)
    if tools is not None and grammar is not None:
        raise ValidationError("format and tools cannot be used together")
    if tools is not None and not tools.required:
        core_tools.call_grammar(tools.functions, False)  # compiles the call regex now, off the loop
    return tools


def _chat_message(text: str, stops: list[str], tools: ChatTools | None, run: Run) -> dict:
    if tools is not None and run.end is not None and run.end.finish_reason != "length":
        call = common.read_tool_call(text)
        if call is not None:
            return {"role": "assistant", "content": "", "tool_calls": [call]}
    return {"role": "assistant", "content": trim_stop(text, stops)}


async def _chat_lines(run: Run, name: str, tools: ChatTools | None) -> AsyncIterator[bytes]:
    """Text pieces as they come; a tool call is sent whole, in one line, once it is complete."""
    stops = StopHolder(list(run.stream.entry.request.stopping.stop_sequences))
    seen: list[str] = []
    calling = tools.required if tools is not None else False
    undecided = tools is not None and not tools.required

    def chunk(message: dict) -> bytes:
        return common.line({"model": name, "created_at": common.created_at(), "message": message, "done": False})

    try:
        async for item in run.items():
            piece = "" if item.token.special else item.token.text
            seen.append(piece)
            final = item.end is not None
            if final:
                joined = "".join(seen)
                piece = piece + (item.end.text[len(joined) :] if item.end.text.startswith(joined) else "")
            if undecided:
                head = "".join(seen).lstrip()
                if not head and not final:
                    continue
                undecided, calling = False, core_tools.opens_call(head)
                piece = "".join(seen) if not final else item.end.text
            if calling:
                continue
            out = stops.push(piece, final=final)
            if out:
                yield chunk({"role": "assistant", "content": out})
        if calling:
            message = _chat_message(run.end.text, [], tools, run)
            if "tool_calls" not in message:  # cut short: the text as it is
                message = {"role": "assistant", "content": trim_stop(run.end.text, list(stops.stops))}
            yield chunk(message)
        done = {"role": "assistant", "content": ""}
        yield common.line(
            {"model": name, "created_at": common.created_at(), "message": done, "done": True, **run.final()}
        )
    except EmberError as exc:
        yield common.error_line(exc)


# ---- /api/embed and /api/embeddings ----------------------------------------------------------------


async def _embed(request: Request, state: AppState, token_lists: list[list[int]]) -> list[list[float]]:
    if state.shard_info.get("supports_embeddings") is False:
        raise ValidationError(f"model '{state.model_id}' does not support embeddings")
    return await unless_disconnected(request, state.infer.embed(token_lists))


async def _token_lists(state: AppState, texts: list[str], truncate: bool) -> list[list[int]]:
    most = state.limits.max_input_tokens
    out = []
    for text in texts:
        ids = list((await state.tokenizer.encode(text)).ids)
        if len(ids) > most:
            if not truncate:
                raise ValidationError(f"the input length ({len(ids)} tokens) exceeds the context length ({most})")
            ids = ids[:most]
        if not ids:
            raise ValidationError("input cannot be empty")
        out.append(ids)
    return out


def _inputs(body: dict) -> list[str]:
    value = body.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BodyError("input: expected a string or a list of strings")


async def embed(request: Request) -> Response:
    arrived = time.monotonic()
    try:
        body = await common.body_of(request)
        name = common.model_name(body)
        texts = _inputs(body)
        truncate = _typed(body, "truncate", (bool,))
        state, load_s = await load_model(request, body)
        token_lists = await _token_lists(state, texts, truncate is not False)
        vectors = await _embed(request, state, token_lists) if token_lists else []
    except EmberError as exc:
        return common.ollama_error(exc)
    return JSONResponse(
        {
            "model": name,
            "embeddings": vectors,
            "total_duration": max(common.ns(time.monotonic() - arrived), 1),
            "load_duration": max(common.ns(load_s), 1),
            "prompt_eval_count": sum(len(t) for t in token_lists),
        }
    )


async def embeddings(request: Request) -> Response:
    """The older route: one `prompt`, one `embedding` (empty for an empty prompt, as Ollama answers)."""
    try:
        body = await common.body_of(request)
        common.model_name(body)
        prompt = _typed(body, "prompt", (str,)) or ""
        state, _ = await load_model(request, body)
        token_lists = await _token_lists(state, [prompt], True) if prompt else []
        vectors = await _embed(request, state, token_lists) if token_lists else [[]]
    except EmberError as exc:
        return common.ollama_error(exc)
    return JSONResponse({"embedding": vectors[0]})


def routes(state: AppState) -> list[Route]:
    return [
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/embeddings", embeddings, methods=["POST"]),
    ]
