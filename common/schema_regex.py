"""The regex a grammar stands for: a JSON schema through outlines-core with exact integer bounds, or a regex.

Both sides need it: the router validates a request's grammar before queueing
it (422 on a bad one) and the shard compiles the same regex into an index over
the model's vocabulary (`ember.shard.grammar`). It imports no torch.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

import outlines_core
from outlines_core.json_schema import build_regex_from_schema

from ember.proto import generate_pb2

# Optional single spaces between JSON tokens: an unbounded whitespace pattern
# lets small models loop on whitespace forever (outlines' advice).
JSON_WHITESPACE = r"[ ]?"


class GrammarError(ValueError):
    """The grammar is not a valid regex or JSON schema (the router answers 422)."""


def grammar_kind(grammar_type: int | str) -> str:
    """Normalise a proto GrammarType or a TGI-style name to "json" / "regex"."""
    if grammar_type in (generate_pb2.GRAMMAR_TYPE_JSON, "json", "json_object", "json_schema"):
        return "json"
    if grammar_type in (generate_pb2.GRAMMAR_TYPE_REGEX, "regex"):
        return "regex"
    raise GrammarError(f"unknown grammar type {grammar_type!r}")


def _schema_text(value: str | dict) -> str:
    """Return the schema as JSON text; a Python dict is accepted for convenience."""
    if isinstance(value, dict):
        return json.dumps(value)
    try:
        json.loads(value)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"grammar is not valid JSON: {exc}") from exc
    return value


@lru_cache(maxsize=1)
def _single_byte_vocabulary() -> outlines_core.Vocabulary:
    """Every byte as its own token: any valid regex is compatible with it."""
    return outlines_core.Vocabulary(256, {bytes([b]): [b] for b in range(256)})


def _digits_range(lo: str, hi: str) -> str:
    """Regex for the digit strings between `lo` and `hi` of the same length (inclusive)."""
    if lo == hi:
        return lo
    n = len(lo)
    if lo == "0" * n and hi == "9" * n:
        return f"[0-9]{{{n}}}" if n > 1 else "[0-9]"
    if n == 1:
        return f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return lo[0] + f"({_digits_range(lo[1:], hi[1:])})"
    rest = n - 1
    parts = [lo[0] + f"({_digits_range(lo[1:], '9' * rest)})"]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}][0-9]{{{rest}}}")
    parts.append(hi[0] + f"({_digits_range('0' * rest, hi[1:])})")
    return "|".join(parts)


def _natural_range(lo: int, hi: int | None) -> str:
    """Regex for the integers lo..hi (hi None = unbounded), 0 <= lo, without leading zeros."""
    parts = []
    length = len(str(lo))
    top = hi if hi is not None else 10**length - 1
    while lo <= top:
        end = min(top, 10**length - 1)
        parts.append(_digits_range(str(lo), str(end)))
        lo, length = 10**length, length + 1
    if hi is None:
        parts.append(f"[1-9][0-9]{{{length - 1},}}")
    return "|".join(f"({p})" for p in parts)


def integer_range_regex(lo: int | None, hi: int | None) -> str:
    """Regex for the JSON integers in [lo, hi] (None = unbounded on that side)."""
    if lo is not None and hi is not None and lo > hi:
        raise GrammarError(f"empty integer range [{lo}, {hi}]")
    parts = []
    if hi is None or hi >= 0:
        parts.append(_natural_range(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        top_magnitude = None if lo is None else -lo
        low_magnitude = max(1, -hi) if hi is not None else 1
        parts.append(f"-({_natural_range(low_magnitude, top_magnitude)})")
    return "(" + "|".join(f"({p})" for p in parts) + ")"


def _integer_bounds(schema: dict) -> tuple[int | None, int | None]:
    """Integer bounds of a schema from minimum/maximum and their exclusive forms."""
    lo = hi = None
    if isinstance(schema.get("minimum"), (int, float)):
        lo = math.ceil(schema["minimum"])
    if isinstance(schema.get("exclusiveMinimum"), (int, float)) and not isinstance(schema["exclusiveMinimum"], bool):
        lo = max(lo if lo is not None else -math.inf, math.floor(schema["exclusiveMinimum"]) + 1)
    if isinstance(schema.get("maximum"), (int, float)):
        hi = math.floor(schema["maximum"])
    if isinstance(schema.get("exclusiveMaximum"), (int, float)) and not isinstance(schema["exclusiveMaximum"], bool):
        hi = min(hi if hi is not None else math.inf, math.ceil(schema["exclusiveMaximum"]) - 1)
    return lo, hi


def _mark_bounded_integers(node: Any, marks: dict[str, str]) -> Any:
    """Replace bounded integer subschemas by unique string constants, remembering their regexes.

    outlines-core ignores minimum/maximum on integers, so a constrained model
    could emit 999 for an age bounded to 0..120. Each such subschema becomes a
    placeholder constant; its quoted form in the generated regex is then
    swapped for an exact integer-range regex.
    """
    if isinstance(node, list):
        return [_mark_bounded_integers(item, marks) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "integer" and "enum" not in node and "const" not in node:
        lo, hi = _integer_bounds(node)
        if lo is not None or hi is not None:
            marker = f"__ember_integer_range_{len(marks)}__"
            marks[f'"{marker}"'] = integer_range_regex(lo, hi)
            return {"const": marker}
    return {key: _mark_bounded_integers(value, marks) for key, value in node.items()}


def _json_regex(value: str | dict) -> str:
    """JSON schema -> regex through outlines-core, with exact integer bounds."""
    schema = json.loads(_schema_text(value))
    marks: dict[str, str] = {}
    schema = _mark_bounded_integers(schema, marks)
    regex = build_regex_from_schema(json.dumps(schema), JSON_WHITESPACE)
    for placeholder, integer_regex in marks.items():
        regex = regex.replace(placeholder, integer_regex)
    return regex


def regex_for(grammar_type: int | str, value: str | dict, validate: bool = True) -> str:
    """The regex a grammar stands for; with `validate`, also check it compiles.

    Validation builds the automaton over a 256-token byte vocabulary, so it uses
    outlines-core's own regex engine (whose syntax differs from Python's `re`)
    without needing the model's tokenizer. Raises `GrammarError`.
    """
    kind = grammar_kind(grammar_type)
    if kind == "json":
        try:
            regex = _json_regex(value)
        except GrammarError:
            raise
        except Exception as exc:  # outlines-core raises ValueError/TypeError/RuntimeError
            raise GrammarError(f"invalid JSON schema: {exc}") from exc
    else:
        if not isinstance(value, str) or not value:
            raise GrammarError("a regex grammar must be a non-empty string")
        regex = value
    if validate:
        try:
            outlines_core.Index(regex, _single_byte_vocabulary())
        except Exception as exc:
            raise GrammarError(f"invalid regex: {exc}") from exc
    return regex
