"""Pure formatting helpers for numbers the screens show (sizes, rates, times, routes)."""

from __future__ import annotations

import time
from typing import Any

_UNITS = ("B", "KB", "MB", "GB", "TB")


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1000 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - loop always returns


def human_rate(bps: float | None) -> str:
    return "—" if bps is None else f"{human_bytes(bps)}/s"


def human_eta(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "—"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def clock(ts: float | str | None) -> str:
    """Wall-clock HH:MM:SS of a unix time (strings are passed through, trimmed)."""
    if ts is None or ts == "":
        return "—"
    if isinstance(ts, str):
        return ts[11:19] if len(ts) >= 19 and ts[10] in "T " else ts
    return time.strftime("%H:%M:%S", time.localtime(ts))


def number(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None or value == "":
        return "—"
    try:
        return f"{float(value):.{digits}f}{unit}"
    except (TypeError, ValueError):
        return str(value)


def short_id(peer_id: str | None, width: int = 12) -> str:
    if not peer_id:
        return "—"
    return peer_id if len(peer_id) <= width else peer_id[: width - 1] + "…"


def route_kind(route: Any) -> str:
    """The route's kind from either a bare string or a `shoal_route` dict."""
    if isinstance(route, dict):
        return str(route.get("kind") or "?")
    return str(route) if route else "—"


def route_replans(route: Any, record: dict[str, Any] | None = None) -> int:
    if isinstance(route, dict):
        return int(route.get("replans") or 0)
    return int((record or {}).get("replans") or 0)


def describe_route(route: Any) -> str:
    """One line, e.g. `split via a1b2…, c3d4… (2 spans, 1 re-plan)`; with the stages' timing, how the remote
    ones were reached: `(2 spans over direct, 1 re-plan)` (a direct tensor link or the data `channel`)."""
    if not isinstance(route, dict):
        return route_kind(route)
    parts = [route_kind(route)]
    peers = [
        short_id(p if isinstance(p, str) else p.get("name") or p.get("id"), 10)
        for p in route.get("peers") or []
    ]
    if peers:
        parts.append("via " + ", ".join(peers))
    extra = []
    if route.get("spans"):
        links = [str(t.get("link")) for t in route.get("stage_timing") or []
                 if isinstance(t, dict) and t.get("link") in ("direct", "channel")]
        extra.append(f"{len(route['spans'])} spans" + (f" over {'+'.join(links)}" if links else ""))
    if route.get("replans"):
        n = int(route["replans"])
        extra.append(f"{n} re-plan{'s' if n != 1 else ''}")
    if extra:
        parts.append("(" + ", ".join(extra) + ")")
    return " ".join(parts)
