"""Ollama's Modelfile: parsed for /api/create, written by /api/show so that it can be created back.

A Modelfile is one instruction a line (`FROM`, `PARAMETER name value`, `TEMPLATE`, `SYSTEM`,
`MESSAGE role text`, `LICENSE`, `ADAPTER`), case-insensitive, `#` starting a comment line. A value
runs to the end of its line, or is wrapped in `\"\"\"` and may span lines, or in `"` (a JSON string).
`PARAMETER` values are typed here (integers, floats, booleans, strings); `stop` may repeat and
collects into a list, as Ollama's options take it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

COMMANDS = ("from", "adapter", "parameter", "template", "system", "message", "license")
ROLES = ("system", "user", "assistant", "tool")
LIST_PARAMETERS = ("stop",)
_TRIPLE = '"""'
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z")


class ModelfileError(ValueError):
    """A Modelfile that cannot be read; the message names the line and what was expected."""


@dataclass
class Modelfile:
    base: str | None = None
    template: str | None = None
    system: str | None = None
    license: str | None = None
    adapters: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)


def parse(text: str) -> Modelfile:
    """The instructions of a Modelfile; `ModelfileError` for an unknown instruction or a broken value."""
    result = Modelfile()
    lines = text.replace("\r\n", "\n").split("\n")
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        number = index + 1
        index += 1
        if not line or line.startswith("#"):
            continue
        command, _, rest = line.partition(" ")
        command = command.lower()
        if command not in COMMANDS:
            raise ModelfileError(
                f"line {number}: unknown instruction {command.upper()!r} (expected one of "
                f"{', '.join(c.upper() for c in COMMANDS)})"
            )
        rest = rest.strip()
        if command in ("parameter", "message"):
            key, _, rest = rest.partition(" ")
            if not key:
                raise ModelfileError(f"line {number}: {command.upper()} needs a name and a value")
            value, index = _value(rest.strip(), lines, index, number)
            _keyed(result, command, key, value, number)
            continue
        value, index = _value(rest, lines, index, number)
        if command == "from":
            result.base = value
        elif command == "adapter":
            result.adapters.append(value)
        else:
            setattr(result, command, value)
    return result


def _value(rest: str, lines: list[str], index: int, number: int) -> tuple[str, int]:
    """The value starting at `rest`: to the end of the line, a JSON string, or `\"\"\"` up to its closing one."""
    if rest.startswith(_TRIPLE):
        body = rest[len(_TRIPLE) :]
        parts = []
        while True:
            end = body.find(_TRIPLE)
            if end >= 0:
                parts.append(body[:end])
                return "\n".join(parts), index
            parts.append(body)
            if index >= len(lines):
                raise ModelfileError(f'line {number}: a value opened with """ is never closed')
            body = lines[index]
            index += 1
    if len(rest) >= 2 and rest.startswith('"') and rest.endswith('"'):
        try:
            return json.loads(rest), index
        except ValueError:
            return rest[1:-1], index
    if not rest:
        raise ModelfileError(f"line {number}: the instruction has no value")
    return rest, index


def _keyed(result: Modelfile, command: str, key: str, value: str, number: int) -> None:
    if command == "message":
        role = key.lower()
        if role not in ROLES:
            raise ModelfileError(f"line {number}: a MESSAGE role is one of {', '.join(ROLES)}, got {key!r}")
        result.messages.append({"role": role, "content": value})
        return
    name = key.lower()
    typed = typed_value(value)
    if name in LIST_PARAMETERS:
        result.parameters.setdefault(name, []).append(value)
    else:
        result.parameters[name] = typed


def typed_value(value: str) -> Any:
    """A PARAMETER value as its JSON type: `40` an int, `0.5` a float, `true` a bool, anything else a string."""
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if _NUMBER.match(value):
        number = float(value)
        return int(value) if re.fullmatch(r"[+-]?\d+", value) else number
    return value


def _quoted(text: str) -> str:
    if _TRIPLE in text:
        return json.dumps(text, ensure_ascii=False)  # a `\"\"\"` inside cannot be triple-quoted
    return f"{_TRIPLE}{text}{_TRIPLE}"


def _parameter_text(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def parameter_lines(parameters: dict[str, Any]) -> list[tuple[str, str]]:
    """`(name, value text)` pairs, a list parameter (`stop`) once per item, sorted by name."""
    pairs = []
    for name in sorted(parameters):
        value = parameters[name]
        for item in value if isinstance(value, list) else [value]:
            pairs.append((name, _parameter_text(item)))
    return pairs


def parameters_text(parameters: dict[str, Any]) -> str:
    """/api/show's `parameters`: one `name value` line each, the value as a Modelfile writes it."""
    return "\n".join(f"{name:<30} {value}" for name, value in parameter_lines(parameters))


def render(modelfile: Modelfile, header: str | None = None) -> str:
    """A Modelfile that `parse` reads back to the same instructions."""
    out = [f"# {line}" for line in (header or "").splitlines()]
    if modelfile.base:
        out.append(f"FROM {modelfile.base}")
    for adapter in modelfile.adapters:
        out.append(f"ADAPTER {adapter}")
    if modelfile.template is not None:
        out.append(f"TEMPLATE {_quoted(modelfile.template)}")
    if modelfile.system is not None:
        out.append(f"SYSTEM {_quoted(modelfile.system)}")
    for name, value in parameter_lines(modelfile.parameters):
        out.append(f"PARAMETER {name} {value}")
    for message in modelfile.messages:
        out.append(f"MESSAGE {message['role']} {_quoted(message['content'])}")
    if modelfile.license is not None:
        out.append(f"LICENSE {_quoted(modelfile.license)}")
    return "\n".join(out) + "\n"
