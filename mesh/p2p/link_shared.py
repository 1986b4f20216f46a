"""What every link of a node shares: its timing and limits (`LinkSettings`, from `MeshConfig`) and the frame
handlers by control type and binary kind (`Handlers`). `p2p.peer` re-exports these names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.mesh.p2p import protocol as p

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
