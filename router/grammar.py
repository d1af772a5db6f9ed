"""Grammar checks in the router: a bad schema or regex is a 422 before queueing.

JSON schemas are compiled to a regex here, with the shard's own rules
(`ember.schema_regex.regex_for`: outlines-core plus exact integer bounds and
single optional spaces between JSON tokens), so the shard only ever receives
GRAMMAR_TYPE_REGEX, as TGI does. When no shard checks the regex (unit
tests), it is checked here with outlines-core's regex engine; on a served
router the shards' CompileGrammar builds the real index and reports an
invalid regex, within the compile time limit, so no regex is compiled twice.
"""

from __future__ import annotations

import json
from typing import Any

from ember.router.errors import ValidationError
from ember.router.types import Grammar
from ember.schema_regex import GrammarError, regex_for


def _schema_value(value: Any) -> dict:
    """A JSON schema given as an object, or a string holding one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValidationError(f"grammar is not valid: {exc}") from None
    if not isinstance(value, dict):
        raise ValidationError("grammar is not valid: a JSON schema must be an object")
    return value


def _check_schema(schema: dict) -> None:
    """Meta-validate against JSON Schema (draft 2020-12) when jsonschema is installed."""
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:  # optional: outlines-core still rejects what it cannot compile
        return
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValidationError(f"grammar is not valid: invalid JSON schema: {exc.message}") from None


def compile_grammar(grammar: Grammar, validate: bool = True) -> tuple[str, str]:
    """('regex', pattern) for the shard; raises ValidationError with TGI's wording.

    `validate`: also build the regex's automaton (over bytes) to check it.
    """
    value = grammar.value
    try:
        if grammar.type == "json":
            value = _schema_value(value)
            _check_schema(value)
        elif not isinstance(value, str):
            raise ValidationError("grammar is not valid: a regex grammar's value must be a string")
        return "regex", regex_for(grammar.type, value, validate=validate)
    except GrammarError as exc:
        raise ValidationError(f"grammar is not valid: {exc}") from None
    except RecursionError:  # the schema checker and the schema-to-regex walk recurse per level
        raise ValidationError("grammar is not valid: the JSON schema is nested too deeply") from None
