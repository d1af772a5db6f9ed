"""Tool calling's grammar, shared by the chat families (OpenAI's and Ollama's).

A call is the JSON object `{"name": <function name>, "arguments": {...}}` whose
`arguments` satisfy that function's `parameters` schema. The grammar is the JSON
schema `anyOf` those objects (one per allowed function), compiled to a regex like
any other JSON grammar. When a call is required the grammar is that schema alone;
otherwise it is the regex `(<call>)|([^{\\s][\\s\\S]*)`: the model's first token
decides, an answer opening with `{` must be a whole, valid call and any other
opening is a text answer. One generation, no restart, and it streams either way.

Only what does not depend on an API's wire shapes lives here: the functions of a
`tools` list, the grammar, the listing put into the prompt, and a generated call
read back as a name and an arguments value. Each family words its own errors,
picks the functions from its `tool_choice` and writes calls in its own shape
(OpenAI: arguments as a JSON string, ids, streamed deltas; Ollama: an object).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ember.router.types import Grammar

TOOL_PROMPT = (
    "You can call one of the functions below. To call one, answer with only a JSON object "
    '{"name": <function name>, "arguments": <arguments object>}.'
)
FREE_TEXT = r"[^{\s][\s\S]*"
"""Under automatic tool choice, an answer that does not open with `{` (or whitespace) is plain text."""

NO_PARAMETERS = {"type": "object", "properties": {}}


class ToolSpecError(ValueError):
    """A malformed `tools` list. `problem` is one of `"not_a_list"`, `"shape"` and `"parameters"`
    (with the function's name): each family turns it into its own message and error type."""

    def __init__(self, problem: str, function: str | None = None) -> None:
        super().__init__(problem if function is None else f"{problem}: {function}")
        self.problem = problem
        self.function = function


def tool_functions(tools: Any, *, blank_parameters: bool = False) -> list[dict]:
    """The `function` objects of an OpenAI-shaped `tools` list, each with a `parameters` schema.

    A missing `parameters` means no arguments. With `blank_parameters`, so does a null or empty
    one (Ollama's clients send those); without it, an empty schema is kept (any arguments) and a
    null one is refused, as OpenAI's route always did.
    """
    if not isinstance(tools, list) or not tools:
        raise ToolSpecError("not_a_list")
    out = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolSpecError("shape")
        params = (fn.get("parameters") or NO_PARAMETERS) if blank_parameters else fn.get("parameters", NO_PARAMETERS)
        if not isinstance(params, dict):
            raise ToolSpecError("parameters", fn["name"])
        out.append({**fn, "parameters": params})
    return out


def call_schema(functions: list[dict]) -> dict:
    """JSON schema of exactly one call of one of `functions`."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def call_grammar(functions: list[dict], required: bool) -> Grammar:
    """One call of one of `functions`; unless `required`, a text answer instead is allowed too.

    The optional form compiles the call's schema to a regex here, which for large schemas takes
    a while: callers on the event loop call this in a worker thread.
    """
    schema = call_schema(functions)
    if required:
        return Grammar("json", schema)
    from ember.router.grammar import compile_grammar

    _, call = compile_grammar(Grammar("json", schema), validate=False)  # checked with the whole grammar
    return Grammar("regex", f"({call})|({FREE_TEXT})")


def tool_listing(functions: list[dict], prompt: str = TOOL_PROMPT) -> str:
    """The tools as text, appended to the last message when the chat template does not render them."""
    shown = [
        {"name": f["name"], "description": f.get("description", ""), "parameters": f["parameters"]} for f in functions
    ]
    return f"\n---\n{prompt}\n{json.dumps(shown, ensure_ascii=False)}"


def opens_call(text: str) -> bool:
    """Whether generated text under the optional grammar is (the start of) a call, not a text answer."""
    return text.lstrip().startswith("{")


class CallError(ValueError):
    """Generated text that is not a whole call: a text answer, or a call cut short (length, stop)."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any  # an object when the function's schema asks for one (the default)


def read_call(text: str) -> ToolCall:
    """The call in generated text, or `CallError`."""
    try:
        call = json.loads(text)
    except ValueError as exc:
        raise CallError(f"the model's tool call is not valid JSON: {exc}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        raise CallError('the model\'s tool call is not a {"name", "arguments"} object')
    return ToolCall(call["name"], call["arguments"])
