"""What discovery, gossip and the dialer need of the mesh service (`p2p.service.MeshService`, which satisfies
them structurally): they take these Protocols rather than import the service that owns them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from shoal.mesh.events import EventBus
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.p2p.join_status import JoinStatus
from shoal.mesh.p2p.peer import ControlHandler, Peer
from shoal.mesh.p2p.signalling import Membership


class MeshSelf(Protocol):
    """Who this node is in the mesh: what every part of p2p reads of the mesh service."""

    @property
    def config(self) -> MeshConfig: ...

    @property
    def identity(self) -> Identity: ...

    @property
    def advertise_address(self) -> str: ...

    @property
    def events(self) -> EventBus: ...

    def spawn(self, coro: Awaitable[Any], name: str = "mesh") -> asyncio.Task[Any]: ...


class PeerRegistry(Protocol):
    """The control-frame handlers and the live links of the mesh service."""

    def on_control(self, frame_type: str, handler: ControlHandler) -> None: ...

    def add_peer_listener(self, listener: Callable[[str, Peer], None]) -> None: ...

    def connected_peers(self) -> list[Peer]: ...


class GossipHost(MeshSelf, PeerRegistry, Protocol):
    """What gossip needs of the mesh service (`p2p.service.MeshService`)."""


class DiscoveryHost(MeshSelf, PeerRegistry, Protocol):
    """What discovery needs of the mesh service (`p2p.service.MeshService`): also whom it links to or has
    heard of, and how to dial (directly or through a relay) and answer offers."""

    @property
    def membership(self) -> Membership: ...

    @property
    def join_status(self) -> JoinStatus: ...

    @property
    def saved_bootstrap(self) -> tuple[str, ...]: ...

    @property
    def peers(self) -> dict[str, Peer]: ...

    @property
    def known(self) -> dict[str, dict[str, Any]]: ...

    @property
    def relay_answers(self) -> dict[str, asyncio.Future[dict[str, Any]]]: ...

    def is_banned(self, peer_id: str) -> bool: ...

    def is_dialing(self, peer_id: str) -> bool: ...

    async def connect_address(self, address: str, expected: str | None = None) -> Peer: ...

    async def connect_via(self, relay: Peer, target: str) -> Peer: ...

    async def handle_offer(self, raw: object) -> dict[str, Any]: ...


class LinkHost(MeshSelf, Protocol):
    """What the dialer (`p2p.dialer.Dialer`) needs of the mesh service: also which mesh it is in, whom it
    links to or bans, and an HTTP session to signal over."""

    @property
    def membership(self) -> Membership: ...

    @property
    def peers(self) -> dict[str, Peer]: ...

    @property
    def running(self) -> bool: ...

    @property
    def session(self) -> aiohttp.ClientSession: ...

    def is_banned(self, peer_id: str) -> bool: ...
