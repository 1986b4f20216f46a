"""`keep_alive`: how long a model stays loaded after a request, as Ollama's API spells it.

A number is seconds; a string is a Go duration (`"5m"`, `"1h30m"`, `"250ms"`, `"-1m"`) or a plain number of
seconds (`"300"`). Negative means forever (the model is never unloaded automatically), 0 unloads it right
after the request. Anything past a year counts as forever. A bad value is a 400 naming the field.
"""

from __future__ import annotations

import math
import re
from typing import Any

from shoal.mesh.api.errors import invalid

FOREVER = -1.0
MAX_FINITE_S = 366 * 86400.0
"""A finite keep_alive longer than this (a year) is taken as forever."""
MAX_TEXT = 40
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_WANTED = "'{param}' must be a duration like \"5m\" or a number of seconds"
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def _duration(text: str) -> float | None:
    """A Go duration string in seconds, or None when it is not one."""
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-") if text[:1] in "+-" else text
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(body):
        match = _PART.match(body, pos)
        if match is None:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return sign * total if body else None


def parse_keep_alive(value: Any, param: str = "keep_alive") -> float | None:
    """Seconds (`FOREVER` for negative or very long), or None when the field is absent (null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise invalid(_WANTED.format(param=param), param, "invalid_type")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text or len(text) > MAX_TEXT:
            raise invalid(f"'{param}' must be a duration like \"5m\", \"1h\" or \"-1\" (forever)", param)
        try:
            seconds = float(text)
        except ValueError:
            parsed = _duration(text)
            if parsed is None:
                raise invalid(f"'{param}' {text!r} is not a duration (e.g. \"30s\", \"5m\", \"1h\", \"-1\")",
                              param) from None
            seconds = parsed
    else:
        raise invalid(_WANTED.format(param=param), param, "invalid_type")
    if math.isnan(seconds):
        raise invalid(f"'{param}' must be a number of seconds, not NaN", param)
    if seconds < 0 or seconds > MAX_FINITE_S:
        return FOREVER
    return seconds
