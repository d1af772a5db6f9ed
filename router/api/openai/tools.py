"""Tool calling: the grammar that allows exactly one call, and reading the call back.

A call is the JSON object `{"name": <function name>, "arguments": {...}}`,
whose `arguments` satisfy that function's `parameters` schema. The grammar
is the JSON schema `anyOf` those objects (one per allowed function), compiled
to a regex like any other JSON grammar:

- `tool_choice: "required"`: any of the tools; a named function: only it;
- `tool_choice: "none"` (or no tools): no grammar, plain text;
- `tool_choice: "auto"` (the default with tools): the regex
  `(<call>)|([^{\\s][\\s\\S]*)`. The model's first token decides: an answer
  that starts with `{` must be a complete, valid call; any other start is a
  free-text answer. One generation, no restart, and it streams either way.

The tools are shown to the model through the template's `tools` variable
when the template uses it, and otherwise appended to the last message.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ember.router.errors import ValidationError
from ember.router.types import Grammar

DEFAULT_TOOL_PROMPT = (
    "You can call one of the functions below. To call one, answer with only a JSON object "
    '{"name": <function name>, "arguments": <arguments object>}.'
)
# A free-text answer under tool_choice=auto: anything not starting with `{` or whitespace.
TEXT_ANSWER = r"[^{\s][\s\S]*"
_CALL_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class ToolError(ValidationError):
    prefix = "Tool error: "


@dataclass
class ToolPlan:
    """What a chat request's tools turn into: a grammar, and how to read the output."""

    grammar: Grammar | None
    tools: list[dict]
    required: bool  # the output is always a call (required / named)
    prompt: str


def _functions(tools: Any) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise ToolError("`tools` must be a non-empty list")
    out = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError('each tool must be {"type": "function", "function": {"name": ..., "parameters": ...}}')
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"function {fn['name']}: `parameters` must be a JSON schema object")
        out.append({**fn, "parameters": params})
    return out


def _chosen(functions: list[dict], tool_choice: Any) -> tuple[list[dict], str]:
    """The functions the grammar allows, and the mode: none, auto or required."""
    if tool_choice is None or tool_choice == "auto":
        return functions, "auto"
    if tool_choice in ("none", "required"):
        return functions, tool_choice
    name = None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
    elif isinstance(tool_choice, str):
        name = tool_choice  # TGI accepts a bare function name
    match = [f for f in functions if f["name"] == name]
    if not match:
        raise ToolError(f"Tool with name {name} not found")
    return match, "required"


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


def plan(tools: Any, tool_choice: Any, tool_prompt: str | None) -> ToolPlan:
    """The grammar and prompt text for a request's `tools` / `tool_choice`."""
    functions = _functions(tools)
    allowed, mode = _chosen(functions, tool_choice)
    prompt = tool_prompt if isinstance(tool_prompt, str) else DEFAULT_TOOL_PROMPT
    if mode == "none":
        return ToolPlan(None, functions, False, prompt)
    schema = call_schema(allowed)
    if mode == "required":
        return ToolPlan(Grammar("json", schema), functions, True, prompt)
    from ember.router.grammar import compile_grammar

    _, call_regex = compile_grammar(Grammar("json", schema), validate=False)  # checked with the whole grammar
    return ToolPlan(Grammar("regex", f"({call_regex})|({TEXT_ANSWER})"), functions, False, prompt)


def tool_text(tools: list[dict], prompt: str) -> str:
    """What is appended to the last message when the template does not render tools."""
    listing = json.dumps(
        [{"name": f["name"], "description": f.get("description", ""), "parameters": f["parameters"]} for f in tools],
        ensure_ascii=False,
    )
    return f"\n---\n{prompt}\n{listing}"


def is_call(text: str, required: bool) -> bool:
    """Whether generated text is (the start of) a call rather than a text answer."""
    return required or text.lstrip().startswith("{")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(text: str) -> dict:
    """A finished call's output as OpenAI's tool_calls entry (arguments as a JSON string)."""
    try:
        call = json.loads(text)
        name, arguments = call["name"], call["arguments"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ToolError(f"the model's tool call is not valid JSON: {exc}") from None
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


class CallStreamer:
    """Turns a streamed call's text into OpenAI tool-call deltas.

    Nothing is sent until the function's name is known; then argument text
    is released as it arrives, except trailing whitespace and a final `}`
    (which may close the call object rather than the arguments). The pieces
    concatenate to the arguments' JSON text.
    """

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self.args_start = 0
        self.sent = 0
        self.id = new_call_id()

    def push(self, piece: str) -> list[dict]:
        self.text += piece
        deltas = []
        if self.name is None:
            head = _CALL_HEAD.match(self.text)
            if head is None:
                return []
            self.name = json.loads(f'"{head.group(1)}"')
            self.args_start = head.end()
            deltas.append(
                {"index": 0, "id": self.id, "type": "function", "function": {"name": self.name, "arguments": ""}}
            )
        # Held back: trailing whitespace and one final `}` (it may close the call object).
        ready = self.text[self.args_start :].rstrip()
        if ready.endswith("}"):
            ready = ready[:-1].rstrip()
        if len(ready) > self.sent:
            deltas.append({"index": 0, "function": {"arguments": ready[self.sent :]}})
            self.sent = len(ready)
        return deltas
