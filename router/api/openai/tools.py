"""OpenAI's tool calling: `tool_choice`, its error wording, and calls in OpenAI's shapes.

The grammar, the listing shown to the model and reading a call back are the core's
(`ember.router.tools`, shared with Ollama's chat); this module adds what is OpenAI's:

- `tool_choice: "required"`: any of the tools; a named function: only it;
- `tool_choice: "none"` (or no tools): no grammar, plain text;
- `tool_choice: "auto"` (the default with tools): a call or a text answer, the model's
  first token decides;
- `tool_prompt` replaces the default instructions above the listing;
- a call's `arguments` as a JSON string, with an id, whole or as streamed deltas.

The tools are shown to the model through the template's `tools` variable
when the template uses it, and otherwise appended to the last message.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ember.router import tools as core
from ember.router.errors import ValidationError
from ember.router.types import Grammar

DEFAULT_TOOL_PROMPT = core.TOOL_PROMPT
TEXT_ANSWER = core.FREE_TEXT
_CALL_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_SPEC_WORDING = {
    "not_a_list": "`tools` must be a non-empty list",
    "shape": 'each tool must be {"type": "function", "function": {"name": ..., "parameters": ...}}',
    "parameters": "function {name}: `parameters` must be a JSON schema object",
}


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
    try:
        return core.tool_functions(tools)
    except core.ToolSpecError as exc:
        raise ToolError(_SPEC_WORDING[exc.problem].replace("{name}", str(exc.function))) from None


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


def plan(tools: Any, tool_choice: Any, tool_prompt: str | None) -> ToolPlan:
    """The grammar and prompt text for a request's `tools` / `tool_choice`."""
    functions = _functions(tools)
    allowed, mode = _chosen(functions, tool_choice)
    prompt = tool_prompt if isinstance(tool_prompt, str) else DEFAULT_TOOL_PROMPT
    if mode == "none":
        return ToolPlan(None, functions, False, prompt)
    return ToolPlan(core.call_grammar(allowed, mode == "required"), functions, mode == "required", prompt)


def tool_text(tools: list[dict], prompt: str) -> str:
    """What is appended to the last message when the template does not render tools."""
    return core.tool_listing(tools, prompt)


def is_call(text: str, required: bool) -> bool:
    """Whether generated text is (the start of) a call rather than a text answer."""
    return required or core.opens_call(text)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(text: str) -> dict:
    """A finished call's output as OpenAI's tool_calls entry (arguments as a JSON string)."""
    try:
        call = core.read_call(text)
    except core.CallError as exc:
        raise ToolError(str(exc)) from None
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
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
