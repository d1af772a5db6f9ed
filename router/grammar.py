"""Grammar checks in the router: a bad schema or regex is a 422 before queueing.

JSON schemas are compiled to a regex here (outlines-core), so the shard only
ever receives GRAMMAR_TYPE_REGEX for JSON grammars, as TGI does.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ember.router.errors import ValidationError
from ember.router.types import Grammar


def _schema_text(value: Any) -> str:
    """A JSON schema given as an object, or a string holding one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValidationError(f"grammar is not valid: {exc}") from None
    if not isinstance(value, dict):
        raise ValidationError("grammar is not valid: a JSON schema must be an object")
    return json.dumps(value)


def compile_grammar(grammar: Grammar) -> tuple[str, str]:
    """('regex', pattern) for the shard; raises ValidationError with TGI's wording."""
    if grammar.type == "regex":
        try:
            re.compile(grammar.value)
        except re.error as exc:
            raise ValidationError(f"grammar is not valid: {exc}") from None
        return "regex", grammar.value
    from outlines_core.json_schema import build_regex_from_schema

    schema = _schema_text(grammar.value)
    try:
        return "regex", build_regex_from_schema(schema)
    except Exception as exc:  # outlines-core raises its own error types
        raise ValidationError(f"cannot compile regex from schema: {exc}") from None
