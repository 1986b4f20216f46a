"""A `StageLink` without a network, for in-process split tests: calls go straight to a `StageHost`."""

from __future__ import annotations

import itertools
import time
from typing import Any

from shoal.mesh.p2p.errors import RemoteError
from shoal.mesh.p2p.protocol import BinaryFrame
from shoal.mesh.route import LOCAL_PEER
from shoal.mesh.split import wire
from shoal.mesh.split.stage_host import StageHost


class LocalLink:
    """A `StageLink` to a `StageHost` in this process, which sees the calls as coming from peer `local`."""

    peer_id = LOCAL_PEER

    def __init__(self, host: StageHost) -> None:
        self._host = host
        self._calls = itertools.count(1)
        self.advert: dict[str, Any] = {}
        self.api_address: str | None = None
        self.is_open = True
        self.rtt_s: float | None = None
        self.pings = 0
        """Pings the origin sent (a silence made it probe the peer: `split.liveness`)."""

    @property
    def last_seen(self) -> float:
        """A host in this process is always heard from."""
        return time.monotonic()

    async def notify(self, frame_type: str, body: dict[str, Any]) -> None:
        self.pings += frame_type == "ping"

    async def request(self, frame_type: str, body: dict[str, Any], timeout_s: float | None = None) -> dict:
        if frame_type == wire.STAGE_OPEN:
            return await self._host.open(LOCAL_PEER, body)
        if frame_type == wire.STAGE_CLOSE:
            return await self._host.close(LOCAL_PEER, body)
        raise RemoteError("unsupported", frame_type)

    async def request_binary(self, kind: int, meta: dict[str, Any], payload: bytes = b"",
                             timeout_s: float | None = None) -> BinaryFrame:
        return await self._host.compute(LOCAL_PEER, BinaryFrame(kind, next(self._calls), meta, payload))
