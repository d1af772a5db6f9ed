"""`keep_alive` with Ollama's meaning: how long a model stays loaded once its last request ends.

A number is seconds; a string is a Go duration (`"10m"`, `"1h30m"`, `"500ms"`, `"0"`);
zero unloads the model as soon as it is idle, and any negative value keeps it loaded
for good (`FOREVER`). Anything else raises `DurationError` with what was expected,
for a 400 with that message.
"""

from __future__ import annotations

import math
import re

FOREVER = math.inf
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    """Not a keep_alive Ollama would take."""


def go_duration(text: str) -> float:
    """Seconds in a Go duration string: a signed sequence of number+unit terms (`1h30m`, `-1m`, `1.5s`), or `0`."""
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body.lstrip("+-")
    if body == "0":
        return 0.0
    if not body:
        raise DurationError(f"expected a duration like '5m' or '1h30m', got {text!r}")
    total, at = 0.0, 0
    for term in _TERM.finditer(body):
        if term.start() != at:
            break
        total += float(term.group(1)) * _UNITS[term.group(2)]
        at = term.end()
    if at != len(body):
        raise DurationError(f"expected a duration like '5m' or '1h30m' (units ns, us, ms, s, m, h), got {text!r}")
    return sign * total


def keep_alive_seconds(value: float | int | str | None, default: float) -> float:
    """Seconds to keep a model after its last request: `default` when None, `FOREVER` for negative values."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise DurationError("keep_alive must be a number of seconds or a duration string, not a boolean")
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise DurationError("keep_alive must be a number of seconds or a duration string, not NaN")
        seconds = float(value)
    elif isinstance(value, str):
        seconds = go_duration(value)
    else:
        raise DurationError(f"keep_alive must be a number of seconds or a duration string, got {type(value).__name__}")
    return FOREVER if seconds < 0 else seconds


def keep_alive_text(text: str) -> float:
    """A keep_alive written in a flag or env var: plain seconds (`300`, `-1`) or a Go duration (`5m`)."""
    try:
        return keep_alive_seconds(float(text), 0.0)
    except ValueError:
        return keep_alive_seconds(text, 0.0)
