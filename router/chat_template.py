"""The model's chat template, rendered as transformers renders it, in a Jinja sandbox.

The template comes from the tokenizer directory (`chat_template.jinja`, then
`chat_template.json`, then `tokenizer_config.json`'s `chat_template`, a string
or a list of named templates). It is model-supplied code, so it runs in an
immutable sandbox; anything that goes wrong while rendering (a syntax error,
`raise_exception`, a missing key, a sandbox violation) is the client's
messages meeting the template: a 422, never a 500.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ember.router.errors import ValidationError


class TemplateError(ValidationError):
    prefix = "Template error: "


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    """transformers' `tojson` filter: no HTML escaping, unicode kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick(template: Any, name: str) -> str | None:
    """A template string, or the named entry of a list of {name, template}."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get(name) or named.get("default")
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class ChatTemplate:
    """One model's chat template and the special tokens it may reference."""

    def __init__(
        self, source: str | None, tool_source: str | None = None, special_tokens: dict[str, str] | None = None
    ) -> None:
        self.source = source
        self.tool_source = tool_source
        self.special_tokens = special_tokens or {}
        self._compiled: dict[str, Any] = {}

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate:
        d = Path(directory)
        config = _read_json(d / "tokenizer_config.json")
        raw: Any = None
        if (d / "chat_template.jinja").exists():
            raw = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif (d / "chat_template.json").exists():
            raw = _read_json(d / "chat_template.json").get("chat_template")
        if raw is None:
            raw = config.get("chat_template")
        tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(
            _pick(raw, "default"),
            _pick(raw, "tool_use") if isinstance(raw, list) else None,
            {k: v for k, v in tokens.items() if v is not None},
        )

    @property
    def mentions_tools(self) -> bool:
        """Whether the template renders `tools` itself (else the tools go into the prompt text)."""
        return "tools" in (self.source or "")

    def _template(self, source: str):
        if source not in self._compiled:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._compiled[source] = env.from_string(source)
        return self._compiled[source]

    def render(
        self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text. A final assistant message is continued, not closed."""
        source = (self.tool_source if tools and self.tool_source else None) or self.source
        if not source:
            raise TemplateError("this model has no chat template")
        continue_final = bool(messages) and messages[-1].get("role") == "assistant"
        context = {
            **self.special_tokens,
            **extra,
            "messages": messages,
            "tools": tools or None,
            "add_generation_prompt": add_generation_prompt and not continue_final,
        }
        try:
            text = self._template(source).render(**context)
        except ValidationError:
            raise
        except Exception as exc:  # jinja2 TemplateError, SecurityError, TypeError from the template...
            raise TemplateError(f"{type(exc).__name__}: {exc}") from None
        if continue_final:
            text = _cut_after_last(text, messages[-1].get("content") or "")
        return text


def _cut_after_last(text: str, content: str) -> str:
    """Drop what the template appended after the final message (its end-of-turn tokens)."""
    if not content.strip():
        return text
    at = text.rfind(content.strip())
    return text if at < 0 else text[: at + len(content.strip())]
