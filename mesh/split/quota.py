"""Per-peer token quota: how many tokens this node served each peer in the last hour, against `[policy]
max_tokens_per_peer_per_hour` (0 = no quota). Served work is recorded as it ends (an offloaded request) or as
it runs (a hosted stage's rows); a peer over its share is refused with code `quota` (the origin's client sees
429 `peer_quota`). Thread-safe: a direct tensor link records from the stage worker's thread."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from shoal.mesh.p2p.errors import RemoteError
from shoal.mesh.split import wire

WINDOW_S = 3600.0


class PeerQuota:
    """Tokens served per peer over a sliding hour; `limit()` reads the current policy each time."""

    def __init__(self, limit: Callable[[], int], clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._served: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def record(self, peer: str, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            self._served.setdefault(peer, deque()).append((self._clock(), tokens))

    def used(self, peer: str) -> int:
        """Tokens served to `peer` in the last hour."""
        cutoff = self._clock() - WINDOW_S
        with self._lock:
            entries = self._served.get(peer)
            if entries is None:
                return 0
            while entries and entries[0][0] < cutoff:
                entries.popleft()
            if not entries:
                del self._served[peer]
                return 0
            return sum(tokens for _, tokens in entries)

    def retry_after_s(self, peer: str) -> float:
        """Seconds until the oldest recorded work of `peer` leaves the window."""
        with self._lock:
            entries = self._served.get(peer)
            oldest = entries[0][0] if entries else self._clock()
        return max(1.0, oldest + WINDOW_S - self._clock())

    def refusal(self, peer: str) -> str | None:
        """Why `peer` may not have more work now (over its hourly share), or None."""
        limit = self._limit()
        if limit <= 0:
            return None
        used = self.used(peer)
        if used < limit:
            return None
        return (f"peer {peer[:12]} used {used} of its {limit} tokens for this hour "
                f"(max_tokens_per_peer_per_hour); retry in {self.retry_after_s(peer):.0f} s")


def check_allowed(peer: str, gate: Callable[[], str | None], quota: PeerQuota | None) -> None:
    """Refuse work `peer` asks of this node with its coded error: the policy gate's reason (`refused`), or
    the peer past its hourly share (`quota`)."""
    reason = gate()
    if reason is not None:
        raise RemoteError(wire.REFUSED, reason)
    over = quota.refusal(peer) if quota is not None else None
    if over is not None:
        raise RemoteError(wire.QUOTA, over)
