"""The mesh service: links to peers over WebRTC, signed signalling, membership, bans, and the handle other
layers use to talk to peers (`peer()`, `request()`, `on_control()`, `on_binary()`, ...).

`MeshService(config, identity, data_dir, events)` has `start()`/`stop()` and `add_routes(app)`; it publishes
`peer.joined`, `peer.left`, `peer.updated`, `peer.refused` and `peer.banned` events. Discovery and gossip
are parts it owns (`p2p.discovery`, `p2p.gossip`); other layers plug in through its handle (the node wires
the IPFS block exchange, `ipfs.block_exchange.BlockExchange(mesh, store)`, and the split service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiortc import RTCPeerConnection
from shoal.mesh.events import EventBus
from shoal.mesh.p2p import aiortc_tuning
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.dialer import Dialer
from shoal.mesh.p2p.errors import InviteError, MeshError, PeerUnavailable
from shoal.mesh.p2p.ice import enlarge_socket_buffers, restrict_host_addresses
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.p2p.invite import Invite, forget_invite, save_invite
from shoal.mesh.p2p.join_status import JoinStatus
from shoal.mesh.p2p.link_shared import keeps_existing_link
from shoal.mesh.p2p.peer import BinaryHandler, ControlHandler, Handlers, LinkSettings, Peer
from shoal.mesh.p2p.relays import Relays, rest_credentials, turn_secret
from shoal.mesh.p2p.signalling import Membership

__all__ = ["MeshConfig", "MeshService"]
logger = logging.getLogger(__name__)
PeerListener = Callable[[str, Peer], None]


class MeshService:
    """Owns every link of this node. One per process (ICE interface selection is process-wide)."""

    def __init__(
        self,
        config: MeshConfig,
        identity: Identity | None,
        data_dir: str | os.PathLike[str],
        events: EventBus | None = None,
        *,
        api_address: str | None = None,
        pipelines: Callable[[], list[dict[str, Any]]] = list,
    ) -> None:
        """`pipelines()` lists the running multi-device requests for `/v1/mesh/topology` (the node passes its
        request log's)."""
        self.config = config
        self._identity = identity
        self.data_dir = Path(data_dir)
        self.events = events or EventBus()
        self.api_address = api_address
        self.pipelines = pipelines
        self.handlers = Handlers()
        self.settings = LinkSettings(
            heartbeat_interval_s=config.heartbeat_interval_s,
            dead_timeout_s=config.dead_timeout_s,
            request_timeout_s=config.request_timeout_s,
            abuse_limit=config.abuse_limit,
        )
        self.mesh_name = "shoal"
        """Human name of the mesh (from its invite)."""
        self.membership = self._initial_membership()
        self.join_status = JoinStatus()
        """This node's own standing: linked, joining, refused (`mesh` in `GET /v1/mesh/peers`)."""
        self.peers: dict[str, Peer] = {}
        self.known: dict[str, dict[str, Any]] = {}
        """Every peer id ever linked or heard of: {"name", "api"}."""
        self.bans: dict[str, float] = {}
        self.departed: list[dict[str, Any]] = []
        self.dialer = Dialer(self, self._new_peer, self._register)
        """Dials peers and answers their offers (`p2p.dialer`)."""
        self._listeners: list[PeerListener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._running = False
        self.relays = Relays(config, lambda: self.membership, lambda: self.joined_invite)
        """STUN/TURN servers, TURN credentials and TURN checks (`p2p.relays`)."""
        from shoal.mesh.p2p.discovery import Discovery
        from shoal.mesh.p2p.gossip import Gossip
        from shoal.mesh.p2p.rekey import Rekey

        self.gossip = Gossip(self)
        self.discovery = Discovery(self)
        self.rekey = Rekey(self)

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            raise PeerUnavailable("the mesh service has not started (no identity loaded yet)")
        return self._identity

    def set_identity(self, identity: Identity) -> None:
        """Use the node's identity (loaded by the node) instead of loading it in `start()`."""
        self._identity = identity

    def set_api_address(self, address: str | None) -> None:
        """The `host:port` of this node's HTTP API that peers may use (known once the API listens)."""
        self.api_address = address

    # ----- membership ------------------------------------------------------------------------------------

    def _initial_membership(self) -> Membership:
        from shoal.mesh.p2p.rekey import starting_invite

        invite, saved = starting_invite(self.config, self.data_dir)
        self.saved_bootstrap: tuple[str, ...] = invite.bootstrap if invite is not None and saved else ()
        self.joined_invite: Invite | None = invite
        """The invite this node joined with: its STUN/TURN servers are used besides the config's (and an
        expiring one's TURN credential until the mesh secret arrives)."""
        allow = frozenset(self.config.allow)
        if invite is None:
            return Membership(allow=allow)
        self.mesh_name = invite.name
        return Membership.from_invite(invite, allow)

    def invite(self, expires: int | None = None) -> Invite | None:
        """An invite to this mesh with this node as bootstrap (None when the mesh has no secret); with
        `expires` (unix s) one that members refuse after then. A node that joined with an expiring invite and
        has not been handed the secret yet can only pass on that invite (`InviteError` for `expires`)."""
        membership = self.membership
        if not membership.secret:
            return None
        bootstrap = (self.advertise_address,) if self.advertise_address else ()
        if membership.invite_expires is not None:
            if expires is not None:
                raise InviteError("this node holds an expiring invite, not the mesh secret, to make one from")
            expiry, mesh_id = membership.invite_expires, membership.mesh_id
            servers = self.relays.servers()
            held = self.joined_invite.turn_credential if self.joined_invite is not None else None
            return Invite(self.mesh_name, membership.secret, bootstrap, expiry, mesh_id, servers, held)
        invite = Invite(self.mesh_name, membership.secret, bootstrap, servers=self.relays.servers())
        if expires is None:
            return invite
        expiring = invite.expiring(expires)
        if not self.relays.turn:
            return expiring
        secret = turn_secret(membership.secret)
        return expiring.with_turn_credential(*rest_credentials(secret, membership.mesh_id, expiry=expires))

    async def join(self, invite: Invite) -> None:
        """Join a mesh at runtime: adopt its secret (or invite key), save it for restarts, contact its
        bootstrap nodes."""
        self.membership = Membership.from_invite(invite, self.membership.allow)
        self.mesh_name = invite.name
        self.joined_invite = invite
        self.join_status = JoinStatus()
        await asyncio.to_thread(save_invite, self.data_dir, invite)
        self.discovery.add_bootstrap(invite.bootstrap)
        self.events.publish("mesh.joined", mesh=self.membership.mesh_id)
        if self._running:
            self.spawn(self.discovery.mesh_changed(), name="mdns update")

    async def leave(self) -> dict[str, Any]:
        """Leave the mesh: forget its secret (and the saved invite), say bye to and close every link, stop
        dialling its members. The allow-list (configuration) stays. `configured` is true when the config
        still names a secret or invite, which a restart would join again."""
        left = self.membership.mesh_id if self.membership.secret else None
        self.membership = Membership(allow=self.membership.allow)
        self.mesh_name = "shoal"
        self.join_status = JoinStatus()
        self.saved_bootstrap = ()
        self.joined_invite = None
        await asyncio.to_thread(forget_invite, self.data_dir)
        self.discovery.drop_bootstrap()
        peers = [peer for peer in self.peers.values() if peer.peer_id not in self.membership.allow]
        for peer in peers:
            with contextlib.suppress(MeshError, TimeoutError):
                async with asyncio.timeout(0.5):  # wait_for can lose a cancellation (3.11)
                    await peer.notify("bye", {})
        await asyncio.gather(*(peer.close("left the mesh") for peer in peers))
        logger.info("mesh: left mesh %s; closed %d link(s)", left, len(peers))
        self.events.publish("mesh.left", mesh=left)
        if self._running:
            self.spawn(self.discovery.mesh_changed(), name="mdns update")
        configured = bool(self.config.secret or self.config.invite)
        return {"left": left, "closed": len(peers), "configured": configured}

    def adopt_secret(self, secret: bytes, name: str) -> Membership:
        """Take `secret` as the mesh secret, named `name` (`p2p.rekey`); returns the replaced membership."""
        old = self.membership
        self.membership = Membership(secret=secret, allow=old.allow)
        self.mesh_name = name
        return old

    async def rotate(self) -> dict[str, Any]:
        """A new mesh secret, sent to every member linked now (see `p2p.rekey`)."""
        return await self.rekey.rotate()

    @property
    def advertise_address(self) -> str:
        return self.config.advertise or self.api_address or ""

    def is_dialing(self, peer_id: str) -> bool:
        """Whether a dial to `peer_id` is under way (discovery then does not start another)."""
        return self.dialer.is_dialing(peer_id)

    @property
    def running(self) -> bool:
        return self._running

    def is_banned(self, peer_id: str) -> bool:
        until = self.bans.get(peer_id)
        if until is None:
            return False
        if until < time.monotonic():
            del self.bans[peer_id]
            return False
        return True

    # ----- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        if self._identity is None:
            name = self.config.name
            self._identity = await asyncio.to_thread(Identity.load_or_create, self.data_dir, name)
        self._running = True
        restrict_host_addresses(self.config.ice_interfaces)
        enlarge_socket_buffers()
        aiortc_tuning.apply()
        self._session = aiohttp.ClientSession()
        await self.gossip.start()
        await self.discovery.start()
        self.spawn(self.relays.run(), name="turn check")
        logger.info(
            "mesh: node %s (%s) in mesh %s",
            self.identity.peer_id,
            self.identity.name,
            self.membership.mesh_id,
        )

    async def stop(self) -> None:
        """Refuse new links, say bye, close every link, stop the parts (idempotent)."""
        if not self._running:
            return
        self._running = False
        await self.discovery.stop()
        await self.gossip.stop()
        for peer in list(self.peers.values()):
            try:
                async with asyncio.timeout(0.5):  # wait_for can lose a cancellation (3.11)
                    await peer.notify("bye", {})
            except (MeshError, TimeoutError):
                pass
        await asyncio.gather(
            *(peer.close("node stopping") for peer in [*self.peers.values(), *self.dialer.pending])
        )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def spawn(self, coro: Awaitable[Any], name: str = "mesh") -> asyncio.Task[Any]:
        """Run `coro` as a task owned by the service (cancelled in `stop()`)."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, MeshError):
                logger.info("mesh task %s: %s", task.get_name(), exc)
            else:
                logger.error("mesh task %s failed", task.get_name(), exc_info=exc)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise PeerUnavailable("mesh service is not running")
        return self._session

    # ----- the handle for other layers -------------------------------------------------------------------

    def peer(self, peer_id: str) -> Peer:
        peer = self.peers.get(peer_id)
        if peer is None or not peer.is_open:
            raise PeerUnavailable(f"no live link to {peer_id[:12]}")
        return peer

    def connected_peers(self) -> list[Peer]:
        return [peer for peer in self.peers.values() if peer.is_open]

    def on_control(self, frame_type: str, handler: ControlHandler) -> None:
        self.handlers.on_control(frame_type, handler)

    def on_binary(self, kind: int, handler: BinaryHandler) -> None:
        self.handlers.on_binary(kind, handler)

    def add_peer_listener(self, listener: PeerListener) -> None:
        """`listener(event, peer)` with event "joined" or "left", called on the loop."""
        self._listeners.append(listener)

    async def request(
        self, peer_id: str, frame_type: str, body: dict[str, Any], timeout_s: float | None = None
    ) -> dict[str, Any]:
        return await self.peer(peer_id).request(frame_type, body, timeout_s)

    async def notify(self, peer_id: str, frame_type: str, body: dict[str, Any]) -> None:
        await self.peer(peer_id).notify(frame_type, body)

    async def send_tensor(self, peer_id: str, request_id: int, meta: dict[str, Any], payload: bytes) -> None:
        await self.peer(peer_id).send_binary(p.BinaryFrame(p.TENSOR, request_id, meta, payload))

    async def wait_for_peer(self, peer_id: str, timeout_s: float) -> Peer:
        async with asyncio.timeout(timeout_s):
            while True:
                peer = self.peers.get(peer_id)
                if peer is not None and peer.is_open:
                    return peer
                await asyncio.sleep(0.05)

    # ----- making links (p2p.dialer) ----------------------------------------------------------------------

    def _new_peer(self, offerer: bool) -> Peer:
        pc = RTCPeerConnection(self.relays.rtc_configuration())
        return Peer(pc, "?", "?", offerer, self.settings, self.handlers, self._peer_closed, self._peer_abused)

    @property
    def relay_answers(self) -> dict[str, asyncio.Future[dict[str, Any]]]:
        """Offers sent through a relay, by nonce, waiting for their answer (see `discovery`)."""
        return self.dialer.relay_answers

    @property
    def refused(self) -> list[dict[str, Any]]:
        """The last offers this node refused."""
        return self.dialer.refused

    async def connect_address(self, address: str, expected: str | None = None) -> Peer:
        """Link to the node whose API listens at `host:port`, signalling over its WebSocket endpoint."""
        return await self.dialer.connect_address(address, expected)

    async def connect_via(self, relay: Peer, target: str) -> Peer:
        """Link to `target` by relaying signalling through the connected peer `relay` (peer exchange)."""
        return await self.dialer.connect_via(relay, target)

    async def handle_offer(self, raw: object) -> dict[str, Any]:
        """Verify an offer and answer it, or raise `SignallingError` (no connection is created then)."""
        return await self.dialer.handle_offer(raw)

    # ----- link bookkeeping ------------------------------------------------------------------------------

    def _register(self, peer: Peer) -> None:
        if not self._running or peer.state == "closed":
            self.spawn(peer.close("node stopping"))
            return
        old = self.peers.get(peer.peer_id)
        if old is not None and old is not peer and old.state != "closed":
            offers = (peer.peer_id[:12], peer.offer.nonce[:8], old.offer.nonce[:8])
            if keeps_existing_link(old.offer, peer.offer):
                logger.info("mesh: %s: a second link (offer %s) crossed dials; the first (%s) stays", *offers)
                self.spawn(self._retire(peer, old, "duplicate link (crossed dials)"), name="retire link")
                return
            logger.info("mesh: %s: a second link (offer %s) replaces the first (%s)", *offers)
            self.spawn(self._retire(old, peer, "replaced by a new link"), name="retire link")
        self.peers[peer.peer_id] = peer
        self.known[peer.peer_id] = {"name": peer.name, "api": peer.api_address}
        peer.start()
        logger.info("mesh: linked to %s (%s)", peer.peer_id[:12], peer.name)
        self.events.publish("peer.joined", id=peer.peer_id, name=peer.name, api=peer.api_address)
        for listener in self._listeners:
            listener("joined", peer)

    async def _retire(self, loser: Peer, kept: Peer, reason: str) -> None:
        """Close `loser`, a link that lost to `kept` (`keeps_existing_link`), once the peer's heartbeat
        arrives on `kept` (or `kept` closes), at the latest after `dead_timeout_s`. The two ends open a link
        at different moments: until the peer has started `kept`, `loser` may be the only link open there, and
        closing it would be a departure at that end although both ends keep the same link."""
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.dead_timeout_s):
                    await kept.wait_peer_started()
        finally:
            await loser.close(reason)

    def _peer_closed(self, peer: Peer, reason: str) -> None:
        if self.peers.get(peer.peer_id) is not peer:
            return
        del self.peers[peer.peer_id]
        entry = {"time": time.time(), "id": peer.peer_id, "name": peer.name, "reason": reason[:300]}
        self.departed = [*self.departed[-49:], entry]
        self.events.publish("peer.left", id=peer.peer_id, name=peer.name, reason=reason)
        for listener in self._listeners:
            listener("left", peer)

    def _peer_abused(self, peer: Peer, reason: str) -> None:
        if self.config.ban_s > 0:
            self.bans[peer.peer_id] = time.monotonic() + self.config.ban_s
        logger.warning("mesh: banning %s for %.0f s: %s", peer.peer_id[:12], self.config.ban_s, reason)
        self.events.publish("peer.banned", id=peer.peer_id, reason=reason[:300], seconds=self.config.ban_s)
        self.spawn(peer.close(f"banned: {reason}"))

    # ----- views -----------------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        from shoal.mesh.p2p.routes import add_mesh_routes

        add_mesh_routes(app, self)
