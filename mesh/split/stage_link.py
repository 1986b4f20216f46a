"""What a `RemoteStage` (`split.remote_stage`) needs of the link to its peer, and what the origin keeps of its
calls: the `StageLink` protocol (`p2p.peer.Peer` satisfies it; tests use in-process links), the host a
direct tensor link connects to (`direct_host`) and the addresses that did not connect
(`DirectLinkFailures`), per-stage call accounting (`LinkTiming`), and what the origin saw of a sequence for
its receipt (`StageSeen`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shoal.mesh.p2p.protocol import BinaryFrame


class StageLink(Protocol):
    """The link a `RemoteStage` talks over (`p2p.peer.Peer`; tests use in-process links)."""

    peer_id: str

    @property
    def advert(self) -> dict[str, Any]:
        """The peer's gossiped advert (its `api` address among others; {} before the first)."""
        ...

    @property
    def api_address(self) -> str | None:
        """The `host:port` of the peer's HTTP API it signalled with, if any."""
        ...

    @property
    def is_open(self) -> bool: ...

    last_seen: float
    """`time.monotonic()` when the peer was last heard from (`split.liveness` pings a silent one)."""
    rtt_s: float | None

    async def notify(self, frame_type: str, body: dict[str, Any]) -> None: ...

    async def request(
        self, frame_type: str, body: dict[str, Any], timeout_s: float | None = None
    ) -> dict: ...

    async def request_binary(self, kind: int, meta: dict[str, Any], payload: bytes = b"",
                             timeout_s: float | None = None) -> BinaryFrame: ...


@dataclass(frozen=True)
class StageSeen:
    """What the origin saw of one sequence on a peer's stage: its receipt must say the same."""

    peer: str
    seq: int
    """The u32 the origin named the sequence by (the receipt's request is `stage-<seq>`)."""
    models: frozenset[str]
    """Names the receipt may give the model by: the requested name, its CID."""
    tokens_in: int
    """Prompt rows prefilled."""
    tokens_out: int
    """Decode steps run."""


ReceiptSink = Callable[[StageSeen, Any], None]
Progress = Callable[..., None]
"""`mesh.route.Route.progress`: (message, **data) for the request's client; any thread."""


@dataclass
class LinkTiming:
    """Per-stage accounting (for the route trace and the bench)."""

    calls: int = 0
    seconds: float = 0.0
    """Wall time of the calls, as the origin saw them."""
    compute_s: float = 0.0
    """Compute time the stage reported for them: `seconds - compute_s` is what the link and relaying cost."""
    chained: int = 0
    """Of the calls, the chain steps this stage answered: their `seconds` include the earlier stages' compute
    (which only this stage's peer reports back)."""

    def to_dict(self) -> dict[str, float]:
        return {"calls": self.calls, "seconds": round(self.seconds, 4), "compute_s": round(self.compute_s, 4),
                "chained": self.chained}


class DirectLinkFailures:
    """Peers' direct tensor link addresses that did not connect, each remembered for `hold_s`, so that a new
    stage on a peer whose address is unreachable from here (across NATs) does not wait out the handshake
    timeout again. Shared by a router's stages (their threads); plain dict updates, safe under the GIL."""

    def __init__(self, hold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self._clock = clock
        self._until: dict[tuple[str, str], float] = {}

    def recent(self, peer: str, address: str) -> bool:
        until = self._until.get((peer, address))
        return until is not None and self._clock() < until

    def failed(self, peer: str, address: str) -> None:
        now = self._clock()
        if len(self._until) >= 256:  # bounded: drop the expired, then the oldest
            self._until = {k: t for k, t in self._until.items() if t > now} or self._until
            while len(self._until) >= 256:
                del self._until[next(iter(self._until))]
        self._until[(peer, address)] = now + self.hold_s

    def connected(self, peer: str, address: str) -> None:
        self._until.pop((peer, address), None)


def direct_host(link: StageLink) -> str | None:
    """The host a direct tensor link to the peer behind `link` connects to: that of its API address (from
    its advert, or the one it signalled with), or None when it has none."""
    address = link.advert.get("api") or link.api_address
    if not isinstance(address, str) or ":" not in address:
        return None
    return address.rsplit(":", 1)[0].strip("[]")
