"""This node's own place in its mesh, as its API and TUI show it: not in a mesh, waiting, joining, linked, or
refused by the members it asked (their reason code and message), with the back-off before it asks again.

`Discovery` reports each dial's outcome here; `view()` is `mesh` in `GET /v1/mesh/peers`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

TRANSIENT_CODES = frozenset({"glare", "too_many_peers", "not_in_mesh", "replayed", "no_route", "invite_only"})
"""Refusal codes that say nothing about this node's membership: retried on the ordinary back-off."""
REFUSED_FIRST_S = 1.0
"""First wait after a member refused this node; doubled per refusal up to `refused_retry_max_s`."""


def refusal_backoff(previous_s: float, cap_s: float) -> float:
    """The wait after one more refusal, given the last one (`0`: none yet)."""
    return min(max(previous_s * 2, REFUSED_FIRST_S), cap_s)


@dataclass
class Refusal:
    by: str
    """The `host:port` (or peer id, for a relayed offer) that refused."""
    code: str
    reason: str
    time: float
    """Unix time of the refusal."""


class JoinStatus:
    """Outcome of this node's recent attempts to link to the members it dials."""

    def __init__(self) -> None:
        self.last_refusal: Refusal | None = None
        self.refusals = 0
        """Refusals since the last successful link."""
        self.backoff_s = 0.0
        """The wait scheduled after the last refusal."""
        self.next_retry: float | None = None
        """Unix time of the next attempt at the address that refused last."""
        self.last_error: str | None = None
        """The last dial failure that was not a refusal (unreachable address, timeout)."""

    def refused(self, refusal: Refusal, backoff_s: float) -> None:
        self.last_refusal = refusal
        self.refusals += 1
        self.backoff_s = backoff_s
        self.next_retry = refusal.time + backoff_s

    def failed(self, reason: str) -> None:
        self.last_error = reason[:300]

    def linked(self) -> None:
        self.refusals, self.backoff_s, self.next_retry, self.last_error = 0, 0.0, None, None

    def status(self, in_mesh: bool, links: int, dialling: bool) -> str:
        if not in_mesh:
            return "none"
        if links:
            return "linked"
        refusal = self.last_refusal
        if self.refusals and refusal is not None and refusal.code not in TRANSIENT_CODES:
            return "refused"
        return "joining" if dialling else "waiting"

    def view(self, mesh_id: str, in_mesh: bool, links: int, dialling: bool) -> dict[str, Any]:
        """`{"status", "id", "links", "refusals", ...}` plus the last refusal's `code`, `reason`, `by`,
        `at` and `next_retry`/`retry_in_s` while refused."""
        status = self.status(in_mesh, links, dialling)
        view: dict[str, Any] = {"status": status, "id": mesh_id, "links": links, "refusals": self.refusals}
        refusal = self.last_refusal
        if refusal is not None and self.refusals:
            view.update(code=refusal.code, reason=refusal.reason, by=refusal.by, at=refusal.time)
        if status == "refused" and self.next_retry is not None:
            view["next_retry"] = self.next_retry
            view["retry_in_s"] = round(max(0.0, self.next_retry - time.time()), 1)
            view["backoff_s"] = self.backoff_s
        if self.last_error is not None and status != "linked":
            view["last_error"] = self.last_error
        return view
