"""Model names as Ollama spells them, checked before anything else sees them (the first piece of the registry).

A name is `[host/][namespace/]model[:tag]`: the tag is `latest` when absent, and
names compare case-insensitively (`SmolLM2` and `smollm2:latest` are one model).
`hf.co/{owner}/{repo}[:{quant}]` is Ollama's spelling for a GGUF repository on the
Hugging Face Hub, and a bare `{owner}/{repo}` names a Hub repository too.

Every part is letters, digits, `_`, `-` and `.`, starting with a letter or a digit,
so no part can be `..`, empty, absolute or carry a NUL byte; the whole name is at
most `MAX_NAME` characters. A refused name raises `ModelNameError` with the rule it
broke, for a 400 with that message. The store never builds a path from a name: it
keys its entries by `ModelName.key`, which holds only those characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_NAME = 200
MAX_PART = 80
DEFAULT_TAG = "latest"
HUB_HOSTS = ("hf.co", "huggingface.co")
_PART = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")
_HOST = re.compile(r"[a-z0-9][a-z0-9.-]*(:[0-9]{1,5})?\Z")


class ModelNameError(ValueError):
    """A name that breaks a rule; the message says which."""


@dataclass(frozen=True)
class ModelName:
    model: str
    tag: str = DEFAULT_TAG
    namespace: str | None = None
    host: str | None = None

    @property
    def on_hub(self) -> bool:
        """A Hugging Face Hub repository (`hf.co/owner/repo`, or a bare `owner/repo`)."""
        return self.host in HUB_HOSTS or (self.host is None and self.namespace is not None)

    @property
    def display(self) -> str:
        """The canonical spelling, as Ollama lists it: `smollm2:latest`, `hf.co/owner/repo:Q4_K_M`."""
        prefix = "/".join(p for p in (self.host, self.namespace) if p)
        return f"{prefix + '/' if prefix else ''}{self.model}:{self.tag}"

    @property
    def key(self) -> str:
        """A file-name-safe key for the store: the canonical spelling with `/` and `:` replaced."""
        return self.display.replace("/", "--").replace(":", "---")


def _part(value: str, what: str, name: str) -> str:
    if not value:
        raise ModelNameError(f"model name {name!r} has an empty {what}")
    if len(value) > MAX_PART:
        raise ModelNameError(f"the {what} of a model name is at most {MAX_PART} characters")
    if not _PART.match(value):
        raise ModelNameError(
            f"the {what} {value!r} of model name {name!r} must start with a letter or a digit and hold only "
            "letters, digits, '_', '-' and '.'"
        )
    return value


def parse(name: str) -> ModelName:
    """The name's parts, lower-cased, the tag defaulted; `ModelNameError` for a name that breaks a rule."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNameError("a model name must be a non-empty string")
    if len(name) > MAX_NAME:
        raise ModelNameError(f"a model name is at most {MAX_NAME} characters (got {len(name)})")
    if "\x00" in name:
        raise ModelNameError("a model name cannot contain a NUL byte")
    text = name.strip().lower()
    if text.startswith("/") or "\\" in text:
        raise ModelNameError(f"model name {name!r} is a path; name a model as [namespace/]model[:tag]")
    parts = text.split("/")
    if len(parts) > 3:
        raise ModelNameError(f"model name {name!r} has more than three '/'-separated parts (host/namespace/model)")
    last = parts[-1]
    model, _, tag = last.partition(":")
    tag = tag if ":" in last else DEFAULT_TAG
    host = namespace = None
    if len(parts) == 3:
        host, namespace = parts[0], parts[1]
        if not _HOST.match(host):
            raise ModelNameError(f"the host {host!r} of model name {name!r} is not a host name")
    elif len(parts) == 2:
        namespace = parts[0]
    return ModelName(
        model=_part(model, "model", name),
        tag=_part(tag, "tag", name),
        namespace=_part(namespace, "namespace", name) if namespace is not None else None,
        host=host,
    )
