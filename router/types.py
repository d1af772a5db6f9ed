"""The one internal request type every API adapter translates to.

TGI's native routes, OpenAI, Ollama, Jan and SageMaker bodies all become a
`GenerateRequest` (inputs + `GenerateParameters`) before validation; the
validator, queue and batcher know nothing else. Fields TGI's API lacks
(min_p, presence_penalty, logit_bias, ignore_eos, min_new_tokens) are here so
the other adapters need no second pipeline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

from ember.router.errors import BodyError


@dataclass
class Grammar:
    """A constrained-decoding grammar: type is "json" (a schema) or "regex"."""

    type: str
    value: Any


@dataclass
class GenerateParameters:
    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    min_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    return_full_text: bool | None = None
    stop: list[str] = field(default_factory=list)
    truncate: int | None = None
    watermark: bool = False
    details: bool = True
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: Grammar | None = None
    adapter_id: str | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    penalty_window: int = 0
    """Not a TGI field: Ollama's `repeat_last_n` (the penalties count the last N tokens; 0 = all)."""


@dataclass
class GenerateRequest:
    inputs: str
    parameters: GenerateParameters = field(default_factory=GenerateParameters)
    add_special_tokens: bool = True
    prefix_ids: list[int] = field(default_factory=list)
    """Token ids that come before the encoded `inputs`, as they are (Ollama's `context`: an earlier
    exchange continued exactly, not re-tokenized from its text)."""


# JSON field -> accepted Python types, for TGI's GenerateParameters.
_TGI_FIELDS: dict[str, tuple[type, ...]] = {
    "best_of": (int,),
    "temperature": (int, float),
    "repetition_penalty": (int, float),
    "frequency_penalty": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "typical_p": (int, float),
    "do_sample": (bool,),
    "max_new_tokens": (int,),
    "return_full_text": (bool,),
    "stop": (list,),
    "truncate": (int,),
    "watermark": (bool,),
    "details": (bool,),
    "decoder_input_details": (bool,),
    "seed": (int,),
    "top_n_tokens": (int,),
    "grammar": (dict,),
    "adapter_id": (str,),
    # Ember's extension (vLLM's name), so benchmarks can force output lengths on TGI's routes too.
    "ignore_eos": (bool,),
}
_NON_NULL = {"do_sample", "watermark", "details", "decoder_input_details", "stop"}
_FLOATS = {"temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p"}


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (Python's parser accepts them; TGI's does not)."""
    raise ValueError(f"`{name}` is not a valid JSON value")


# A \uD800-\uDFFF escape: the body may hold a lone surrogate, which no tokenizer or encoder takes.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_text(value: Any) -> None:
    """Every string must be valid Unicode (serde_json rejects unpaired surrogates too)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, list):
        for item in value:
            _check_text(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_text(item)


def parse_json(raw: bytes) -> Any:
    """Decode a request body; a syntax error is TGI's 422."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
        if _SURROGATE_ESCAPE.search(raw):
            _check_text(data)
        return data
    except UnicodeEncodeError:
        raise BodyError("invalid JSON: lone Unicode surrogate in a string") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BodyError(f"invalid JSON: {exc}") from None


def _check_type(name: str, value: Any, kinds: tuple[type, ...]) -> Any:
    # bool is an int in Python; JSON true is not a number.
    if isinstance(value, bool) and bool not in kinds:
        raise BodyError(f"parameters.{name}: invalid type: boolean, expected {kinds[0].__name__}")
    if not isinstance(value, kinds):
        raise BodyError(f"parameters.{name}: invalid type: {type(value).__name__}, expected {kinds[0].__name__}")
    if int in kinds and float not in kinds and value < 0:
        raise BodyError(f"parameters.{name}: invalid value: integer `{value}`, expected u32")
    return float(value) if name in _FLOATS else value


def parse_grammar(value: dict) -> Grammar:
    kind = value.get("type")
    if kind in ("json_object", "json_schema"):
        kind = "json"
    if kind not in ("json", "regex") or "value" not in value:
        raise BodyError('parameters.grammar: expected {"type": "json"|"regex", "value": ...}')
    if kind == "regex" and not isinstance(value["value"], str):
        raise BodyError("parameters.grammar: a regex grammar's value must be a string")
    return Grammar(type=kind, value=value["value"])


def parameters_from_tgi(data: Any) -> GenerateParameters:
    """TGI's `parameters` object; omitted entirely means TGI's defaults (sampling on)."""
    if data is None:
        # TGI's default_parameters(): sampling on, no details.
        return GenerateParameters(do_sample=True, details=False)
    if not isinstance(data, dict):
        raise BodyError("parameters: invalid type, expected an object")
    params = GenerateParameters()
    for name, kinds in _TGI_FIELDS.items():
        if name not in data:
            continue
        value = data[name]
        if value is None:
            if name in _NON_NULL:
                raise BodyError(f"parameters.{name}: invalid type: null")
            continue
        value = _check_type(name, value, kinds)
        if name == "stop" and not all(isinstance(s, str) for s in value):
            raise BodyError("parameters.stop: expected a list of strings")
        if name == "grammar":
            value = parse_grammar(value)
        setattr(params, name, value)
    return params


def request_from_tgi(data: Any) -> GenerateRequest:
    """TGI's GenerateRequest body ({"inputs", "parameters"})."""
    if not isinstance(data, dict):
        raise BodyError("expected a JSON object")
    if "inputs" not in data:
        raise BodyError("missing field `inputs`")
    if not isinstance(data["inputs"], str):
        raise BodyError("inputs: invalid type, expected a string")
    return GenerateRequest(inputs=data["inputs"], parameters=parameters_from_tgi(data.get("parameters")))


PARAMETER_NAMES = tuple(f.name for f in fields(GenerateParameters))
