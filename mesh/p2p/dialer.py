"""Making links: dialling a peer (an offer sent over its signalling WebSocket or relayed by a linked peer) and
answering offers. A link that opens goes to the mesh service (`opened(peer)`), which keeps it.

`Dialer(host, new_peer, opened)`: `host` is the mesh service (`p2p.ports.LinkHost`), `new_peer(offerer)` makes
an unlinked `Peer` on a fresh `RTCPeerConnection`, `opened(peer)` takes a link once its channels are open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiortc import RTCSessionDescription
from shoal.mesh.p2p.errors import JoinRefused, LinkClosed, PeerUnavailable, SignallingError
from shoal.mesh.p2p.ice import ice_summary
from shoal.mesh.p2p.link_shared import LinkOffer
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.ports import LinkHost
from shoal.mesh.p2p.signalling import ReplayGuard, build_signal, verify_signal

logger = logging.getLogger(__name__)
SendOffer = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REFUSED = 50


class Dialer:
    """Dials peers and answers their offers for one mesh service; owns the links not yet open."""

    def __init__(
        self, host: LinkHost, new_peer: Callable[[bool], Peer], opened: Callable[[Peer], None]
    ) -> None:
        self._host = host
        self._new_peer = new_peer
        self._opened = opened
        self._dialing: dict[str, asyncio.Future[Peer]] = {}
        self.pending: set[Peer] = set()
        """Links being made (closed by the service when it stops)."""
        self.relay_answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        """Offers sent through a relay, by nonce, waiting for their answer (see `discovery`)."""
        self.refused: list[dict[str, Any]] = []
        """The last offers this node refused: {"time", "from", "reason"}."""
        self._replay = ReplayGuard()

    def is_dialing(self, peer_id: str) -> bool:
        return peer_id in self._dialing

    def _peer(self, offerer: bool) -> Peer:
        peer = self._new_peer(offerer)
        self.pending.add(peer)
        return peer

    def _open(self, peer: Peer) -> None:
        self.pending.discard(peer)
        self._opened(peer)

    # ----- dialling --------------------------------------------------------------------------------------

    async def dial(self, send_offer: SendOffer, expected: str | None) -> Peer:
        host = self._host
        if not host.running:
            raise PeerUnavailable("mesh service is not running")
        if not host.membership.active:
            raise SignallingError("this node has not joined a mesh")
        peer = self._peer(offerer=True)
        dialing: asyncio.Future[Peer] | None = None
        if expected:
            dialing = asyncio.get_running_loop().create_future()
            self._dialing[expected] = dialing
        try:
            async with asyncio.timeout(host.config.connect_timeout_s):
                await peer.pc.setLocalDescription(await peer.pc.createOffer())
                offer = build_signal(
                    host.identity,
                    host.membership,
                    "offer",
                    peer.pc.localDescription.sdp,
                    to=expected or "",
                    api=host.advertise_address,
                )
                answer = verify_signal(
                    await send_offer(offer), host.membership, host.identity.peer_id, "answer", self._replay
                )
                if answer.reply_to != offer["nonce"]:
                    raise SignallingError("answer does not answer this offer")
                if expected and answer.peer_id != expected:
                    raise SignallingError(f"answer came from {answer.peer_id[:12]}, not {expected[:12]}")
                if host.is_banned(answer.peer_id):
                    raise SignallingError(f"{answer.peer_id[:12]} is banned")
                peer.identify(answer.peer_id, answer.name, answer.api or None, answer.admitted)
                peer.offer = LinkOffer(float(offer["ts"]), str(offer["nonce"]))
                await peer.pc.setRemoteDescription(RTCSessionDescription(answer.sdp, "answer"))
                await peer.wait_open(host.config.connect_timeout_s)
        except BaseException as exc:
            why = ice_summary(peer.pc)  # before close() releases the candidates
            await peer.close(f"dial failed: {exc!s:.200}")
            self.pending.discard(peer)
            if dialing is not None and not dialing.done():
                dialing.cancel()
            if isinstance(exc, TimeoutError):
                raise PeerUnavailable(f"connection attempt timed out ({why})") from None
            raise
        finally:
            if expected and self._dialing.get(expected) is dialing:
                del self._dialing[expected]
        self._open(peer)
        return host.peers.get(peer.peer_id, peer)  # the link kept where dials crossed (`keeps_existing_link`)

    async def connect_address(self, address: str, expected: str | None = None) -> Peer:
        """Link to the node whose API listens at `host:port`, signalling over its WebSocket endpoint."""

        async def send_offer(offer: dict[str, Any]) -> Any:
            url = f"http://{address}/v1/mesh/signal"
            async with self._host.session.ws_connect(
                url, timeout=aiohttp.ClientWSTimeout(ws_close=2), max_msg_size=64 * 1024
            ) as ws:
                await ws.send_json({"op": "offer", "signal": offer})
                reply = await ws.receive_json()
            if not isinstance(reply, dict) or reply.get("op") != "answer":
                reason = reply.get("reason") if isinstance(reply, dict) else None
                code = reply.get("code") if isinstance(reply, dict) else None
                code = code[:40] if isinstance(code, str) and code else "refused"
                raise JoinRefused(f"{address} refused the offer: {reason!s:.200}", code, address)
            return reply.get("signal")

        try:
            return await self.dial(send_offer, expected)
        except (aiohttp.ClientError, ValueError, TypeError) as exc:
            raise PeerUnavailable(f"cannot signal {address}: {exc}") from None

    async def connect_via(self, relay: Peer, target: str) -> Peer:
        """Link to `target` by relaying signalling through the connected peer `relay` (peer exchange)."""

        async def send_offer(offer: dict[str, Any]) -> Any:
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self.relay_answers[offer["nonce"]] = future
            try:
                await relay.notify("signal", {"op": "offer", "to": target, "signal": offer})
                return await future
            finally:
                self.relay_answers.pop(offer["nonce"], None)

        return await self.dial(send_offer, target)

    # ----- answering -------------------------------------------------------------------------------------

    def _refuse(self, reason: str, sender: object) -> None:
        entry = {"time": time.time(), "from": str(sender)[:64], "reason": reason[:300]}
        self.refused = [*self.refused[-(MAX_REFUSED - 1):], entry]
        logger.warning("mesh: refused offer from %s: %s", entry["from"][:12], reason)
        self._host.events.publish("peer.refused", **entry)

    async def handle_offer(self, raw: object) -> dict[str, Any]:
        """Verify an offer and answer it, or raise `SignallingError` (no connection is created then)."""
        host = self._host
        sender = raw.get("from") if isinstance(raw, dict) else None
        try:
            if not host.running or not host.membership.active:
                raise SignallingError("this node is not in a mesh", "not_in_mesh")
            offer = verify_signal(raw, host.membership, host.identity.peer_id, "offer", self._replay)
            if host.is_banned(offer.peer_id):
                raise SignallingError("banned", "banned")
            if offer.peer_id not in host.peers and len(host.peers) >= host.config.max_peers:
                raise SignallingError("too many peers", "too_many_peers")
            if offer.peer_id in self._dialing and host.identity.peer_id < offer.peer_id:
                raise SignallingError("glare: this node is dialling you", "glare")
        except SignallingError as exc:
            self._refuse(str(exc), sender)
            raise
        peer = self._peer(offerer=False)
        peer.identify(offer.peer_id, offer.name, offer.api or None, offer.admitted)
        peer.offer = LinkOffer(offer.ts, offer.nonce)
        try:
            await peer.pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
            await peer.pc.setLocalDescription(await peer.pc.createAnswer())
        except (ValueError, AttributeError, TypeError) as exc:
            await peer.close("bad offer SDP")
            self.pending.discard(peer)
            self._refuse(f"unusable SDP: {exc}", sender)
            raise SignallingError(f"unusable SDP: {exc}", "unusable_sdp") from None
        host.spawn(self._finish_incoming(peer), name=f"accept {offer.peer_id[:12]}")
        return build_signal(
            host.identity,
            host.membership,
            "answer",
            peer.pc.localDescription.sdp,
            to=offer.peer_id,
            api=host.advertise_address,
            reply_to=offer.nonce,
            invite=offer.invite_expires if offer.admitted == "invite" else None,
        )

    async def _finish_incoming(self, peer: Peer) -> None:
        try:
            await peer.wait_open(self._host.config.connect_timeout_s)
        except LinkClosed:
            await peer.close(f"did not open ({ice_summary(peer.pc)})")
            self.pending.discard(peer)
            raise
        self._open(peer)
