"""How a peer's refusal or failure reaches the API's client: a coded `mesh.route.RouteFailed` (503/429/400,
never a 500), and which refusals the router re-plans around."""

from __future__ import annotations

import re

from shoal.mesh.p2p.errors import RemoteError
from shoal.mesh.route import RouteFailed
from shoal.mesh.split import wire
from shoal.mesh.split.remote_stage import StageLost

PEER_FAILURES = {
    wire.REFUSED: (503, "peer_refused"),
    wire.QUOTA: (429, "peer_quota"),
    wire.BUSY: (503, "peer_busy"),
    wire.NO_MODEL: (503, "peer_no_model"),
    wire.BAD_REQUEST: (400, "peer_bad_request"),
}
"""How a peer's error code reaches the API's client: (HTTP status, error code). Anything else (a lost link, a
timeout, an internal error) is 503 `peer_unreachable`."""
RETRY_IN = re.compile(r"retry in (\d{1,7}) s")
REPLANNABLE = frozenset({wire.REFUSED, wire.QUOTA, wire.BUSY, wire.NO_MODEL})
"""Peer error codes after which a request is planned again without that peer (never on the same one)."""


def peer_failure(exc: StageLost | RemoteError, peer: str | None = None) -> RouteFailed:
    """The API's error for a request its peer(s) refused or failed (see `PEER_FAILURES`)."""
    who = peer or (exc.peer if isinstance(exc, StageLost) else None) or "a peer"
    status, name = PEER_FAILURES.get(exc.code or "", (503, "peer_unreachable"))
    wait = RETRY_IN.search(str(exc)) if exc.code == wire.QUOTA else None  # `quota.PeerQuota.refusal` says
    return RouteFailed(status, name, f"{who[:16]}: {exc}"[:500],
                       retry_after_s=float(wait.group(1)) if wait else None)
