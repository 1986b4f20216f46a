"""What every link of a node shares: its timing and limits (`LinkSettings`, from `MeshConfig`) and the frame
handlers by control type and binary kind (`Handlers`), and how a link bounds the handlers running for its
peer's requests (`HandlerSlots`). `p2p.peer` re-exports the first two."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.errors import ProtocolError

if TYPE_CHECKING:
    from shoal.mesh.p2p.peer import Peer

ControlHandler = Callable[["Peer", p.ControlFrame], Awaitable[dict[str, Any] | None]]
BinaryHandler = Callable[["Peer", p.BinaryFrame], Awaitable[p.BinaryFrame | None]]


@dataclass(frozen=True)
class LinkSettings:
    """Timing and limits of a link (from `MeshConfig`)."""

    heartbeat_interval_s: float = 1.0
    """How often a ping is sent on `control`."""
    dead_timeout_s: float = 4.0
    """A link with nothing received for this long is closed as dead."""
    request_timeout_s: float = 10.0
    """Default wait for a reply."""
    abuse_limit: int = 5
    """Protocol violations tolerated before the link is closed and the peer banned."""
    high_water: int = 1024 * 1024
    """Bytes queued in a channel before `send` waits for it to drain."""
    low_water: int = 256 * 1024
    """Queued bytes below which a waiting `send` resumes."""
    max_running_handlers: int = 32
    """Handlers for this peer's requests that run at once; the rest wait their turn."""
    max_pending_handlers: int = 512
    """Requests a peer may have waiting for a handler; beyond that each new one is a strike."""


CONCURRENT_DIALS_S = 10.0
"""Two links to one peer whose offers were signed this close together came from dials that crossed."""


@dataclass(frozen=True)
class LinkOffer:
    """The offer a link was made from, which both its ends hold: when it was signed and its nonce."""

    ts: float = 0.0
    nonce: str = ""


def keeps_existing_link(existing: LinkOffer, new: LinkOffer) -> bool:
    """Whether a peer's existing link stays and a second one to it is closed. Dials that crossed (a rejoin
    and a peer exchange, both ends dialling) make two links that may open in either order at either end; each
    end keeps the one whose offer nonce is smaller, so both keep the same one. A link from a later offer
    (the peer restarted, or redialled a link it saw die) replaces one from an earlier offer: later by the
    offers' times, not by which link opened first here, so that here too both ends decide alike. The loser
    is closed only once the peer has started the kept link (`MeshService._retire`)."""
    if abs(new.ts - existing.ts) > CONCURRENT_DIALS_S:
        return existing.ts > new.ts
    return existing.nonce < new.nonce


class Handlers:
    """Per-type control handlers and per-kind binary handlers, shared by all links of a node."""

    def __init__(self) -> None:
        self.control: dict[str, ControlHandler] = {}
        self.binary: dict[int, BinaryHandler] = {}

    def on_control(self, frame_type: str, handler: ControlHandler) -> None:
        if frame_type not in p.CONTROL_LIMITS:
            raise ValueError(f"register {frame_type!r} with protocol.register_control_type first")
        self.control[frame_type] = handler

    def on_binary(self, kind: int, handler: BinaryHandler) -> None:
        if kind not in p.BINARY_KINDS:
            raise ValueError(f"register binary kind {kind} with protocol.register_binary_kind first")
        self.binary[kind] = handler


class HandlerSlots:
    """One link's bound on the handlers of its peer's requests: `max_running_handlers` run at once, and at
    most `max_pending_handlers` are admitted (running or waiting) before a new request is a violation."""

    def __init__(self, settings: LinkSettings) -> None:
        self._running = asyncio.Semaphore(settings.max_running_handlers)
        self._limit = settings.max_pending_handlers
        self.admitted = 0

    def admit(self) -> None:
        """Count one more request waiting for its handler; `ProtocolError` past the limit."""
        if self.admitted >= self._limit:
            raise ProtocolError(f"more than {self._limit} requests waiting")
        self.admitted += 1

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Hold a running slot for an admitted handler; its admission ends with the block, however it ends."""
        try:
            async with self._running:
                yield
        finally:
            self.admitted -= 1
