"""Finding peers: bootstrap addresses (invite/config), mDNS on the LAN (`_shoal._tcp`), and peer exchange
(connected peers tell each other whom they link to; offers to those are relayed through them).

Who dials: an address from the invite/config is always dialled (its peer id is unknown at first); for peers
learned by mDNS or exchange only the node with the smaller peer id dials, so two nodes do not race.
Failed attempts back off exponentially up to `retry_max_s`; a dropped peer whose address is known is
redialled the same way, which is how a restarted node rejoins. An address whose node refused this one (not a
member, invite expired, banned) backs off from 1 s up to `refused_retry_max_s`; each outcome goes to
`service.join_status`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.errors import IdentityError, JoinRefused, MeshError, SignallingError
from shoal.mesh.p2p.identity import public_key_from_peer_id
from shoal.mesh.p2p.join_status import TRANSIENT_CODES, Refusal, refusal_backoff
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.ports import DiscoveryHost

logger = logging.getLogger(__name__)
SERVICE_TYPE = "_shoal._tcp.local."
MAX_EXCHANGED = 64
MAX_TARGETS = 256


@dataclass
class Target:
    """An address worth dialling and how the last tries went."""

    address: str
    peer_id: str | None = None
    bootstrap: bool = False
    backoff_s: float = 0.5
    next_try: float = 0.0
    busy: bool = False
    refused_s: float = 0.0
    """The wait after this address's last refusal (0: not refused since it last linked)."""


class Discovery:
    def __init__(self, service: DiscoveryHost) -> None:
        self.service = service
        self.targets: dict[str, Target] = {}
        self.redial = True
        """Dial addresses learned from links/mDNS (off only in benchmarks that open and close links)."""
        self._task: asyncio.Task[None] | None = None
        self._mdns: Any = None
        self._mdns_info: Any = None
        self._mdns_starting = False
        self._browser: Any = None
        service.on_control("peers", self._on_peers)
        service.on_control("signal", self._on_signal)
        service.add_peer_listener(self._on_peer)

    def add_bootstrap(self, addresses: tuple[str, ...] | list[str]) -> None:
        for address in addresses:
            if address and address != self.service.advertise_address:
                self.targets.setdefault(address, Target(address, bootstrap=True))

    def drop_bootstrap(self) -> None:
        """Stop dialling the bootstrap nodes (the mesh was left)."""
        for address in [a for a, target in self.targets.items() if target.bootstrap]:
            del self.targets[address]

    def _learn(self, peer_id: str, address: str | None) -> None:
        if (
            not address
            or address == self.service.advertise_address
            or peer_id == self.service.identity.peer_id
        ):
            return
        target = self.targets.get(address)
        if target is None:
            learned = [a for a, t in self.targets.items() if not t.bootstrap]
            if len(learned) >= MAX_TARGETS:  # bounded: peers' lists are peer input
                del self.targets[learned[0]]
            self.targets[address] = Target(address, peer_id=peer_id)
        elif target.peer_id != peer_id:
            target.peer_id = peer_id

    async def start(self) -> None:
        self.add_bootstrap((*self.service.config.all_bootstrap(), *self.service.saved_bootstrap))
        self._task = self.service.spawn(self._run(), name="discovery")
        if self.service.config.mdns:
            self._mdns_starting = True
            self.service.spawn(self._start_mdns(), name="mdns")

    async def mesh_changed(self) -> None:
        """Announce the mesh id this node is in now (after a runtime join or a rotation) over mDNS: update
        the TXT record, or start mDNS if the node had no mesh to announce before."""
        if not self.service.config.mdns:
            return
        info = self._mdns_info
        if self._mdns is None or info is None:
            if not self._mdns_starting:
                self._mdns_starting = True
                await self._start_mdns()
            return
        from zeroconf.asyncio import AsyncServiceInfo

        properties = {"id": self.service.identity.peer_id, "mesh": self.service.membership.mesh_id}
        new = AsyncServiceInfo(
            info.type,
            info.name,
            addresses=info.addresses,
            port=info.port,
            properties=properties,
            server=info.server,
        )
        try:
            await (await self._mdns.async_update_service(new))
        except (OSError, RuntimeError) as exc:
            logger.info("mdns update failed: %s", exc)
            return
        self._mdns_info = new

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._mdns is not None:
            mdns, self._mdns, self._mdns_info = self._mdns, None, None
            try:
                if self._browser is not None:
                    await self._browser.async_cancel()
                await mdns.async_unregister_all_services()
                await mdns.async_close()
            except (OSError, RuntimeError) as exc:
                logger.debug("mdns shutdown: %s", exc)

    # ----- dialling loop ---------------------------------------------------------------------------------

    def _should_dial(self, target: Target) -> bool:
        me = self.service.identity.peer_id
        if target.busy or time.monotonic() < target.next_try or not self.service.membership.active:
            return False
        if target.peer_id is None or not (target.bootstrap or self.redial):
            return target.bootstrap
        if target.peer_id in self.service.peers or self.service.is_banned(target.peer_id):
            return False
        return target.bootstrap or me < target.peer_id

    async def _run(self) -> None:
        while True:
            for target in list(self.targets.values()):
                if self._should_dial(target):
                    target.busy = True
                    self.service.spawn(self._dial(target), name=f"dial {target.address}")
            await asyncio.sleep(0.25)

    async def _dial(self, target: Target) -> None:
        try:
            if target.peer_id is not None:
                relay = self._relay_for(target.peer_id)
                if relay is not None:
                    peer = await self.service.connect_via(relay, target.peer_id)
                else:
                    peer = await self.service.connect_address(target.address, target.peer_id)
            else:
                peer = await self.service.connect_address(target.address)
            target.peer_id = peer.peer_id
            target.backoff_s, target.refused_s = 0.5, 0.0
            self.service.join_status.linked()
        except JoinRefused as exc:
            if exc.code in TRANSIENT_CODES:
                self._failed(target, exc)
            else:
                target.refused_s = refusal_backoff(target.refused_s, self.service.config.refused_retry_max_s)
                target.next_try = time.monotonic() + target.refused_s
                refusal = Refusal(target.address, exc.code, str(exc)[:300], time.time())
                wait = target.refused_s
                logger.warning("mesh: %s refused this node (retry in %.1f s): %s", target.address, wait, exc)
                self.service.join_status.refused(refusal, target.refused_s)
                self.service.events.publish(
                    "mesh.refused", by=refusal.by, code=refusal.code, reason=refusal.reason, retry_in_s=wait
                )
        except MeshError as exc:
            self._failed(target, exc)
        finally:
            target.busy = False

    def _failed(self, target: Target, exc: MeshError) -> None:
        target.next_try = time.monotonic() + target.backoff_s
        logger.info("dial %s failed (retry in %.1f s): %s", target.address, target.backoff_s, exc)
        target.backoff_s = min(target.backoff_s * 2, self.service.config.retry_max_s)
        self.service.join_status.failed(f"{target.address}: {exc}")

    def dialling(self) -> bool:
        """Whether some address is still worth dialling (a bootstrap address, or a learned one not linked)."""
        return any(t.bootstrap or t.peer_id not in self.service.peers for t in self.targets.values())

    def _relay_for(self, peer_id: str) -> Peer | None:
        """A linked node whose advert lists a link to `peer_id`. Not a browser member: a tab relays no
        signalling, so a dial through one would wait out its whole timeout, refusing (glare) the dials of
        `peer_id` meanwhile."""
        for peer in self.service.connected_peers():
            if peer.advert.get("kind") == "browser":
                continue
            links = peer.advert.get("links")
            if isinstance(links, dict) and peer_id in links:
                return peer
        return None

    # ----- peer exchange ---------------------------------------------------------------------------------

    def _on_peer(self, event: str, peer: Peer) -> None:
        if event == "joined":
            self._learn(peer.peer_id, peer.api_address)
            for target in self.targets.values():
                if target.peer_id == peer.peer_id:
                    target.backoff_s, target.next_try = 0.5, 0.0
            listing = self._listing()
            for other in self.service.connected_peers():
                self.service.spawn(self._send_listing(other, listing), name="peers")

    def _listing(self) -> dict[str, Any]:
        entries = [
            {"id": peer.peer_id, "name": peer.name, "api": peer.api_address or ""}
            for peer in self.service.connected_peers()
        ]
        return {"peers": entries[:MAX_EXCHANGED]}

    async def _send_listing(self, peer: Peer, listing: dict[str, Any]) -> None:
        try:
            await peer.notify("peers", listing)
        except MeshError as exc:
            logger.debug("peer list to %s not sent: %s", peer.peer_id[:12], exc)

    async def _on_peers(self, relay: Peer, frame: p.ControlFrame) -> None:
        entries = frame.body.get("peers")
        if not isinstance(entries, list) or len(entries) > MAX_EXCHANGED:
            raise p.ProtocolError("peers frame needs a list of at most 64 entries")
        me = self.service.identity.peer_id
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                raise p.ProtocolError("malformed peers entry")
            peer_id, api = entry["id"], entry.get("api")
            try:
                public_key_from_peer_id(peer_id)
            except IdentityError:
                raise p.ProtocolError("peers entry with a malformed id") from None
            if peer_id == me:
                continue
            name = entry.get("name") if isinstance(entry.get("name"), str) else "?"
            api = api if isinstance(api, str) and 3 <= len(api) <= 200 else None
            if peer_id not in self.service.known and len(self.service.known) >= MAX_TARGETS:
                del self.service.known[next(iter(self.service.known))]
            self.service.known.setdefault(peer_id, {"name": name[:64], "api": api})
            if peer_id in self.service.peers or self.service.is_banned(peer_id):
                continue
            if api:
                self._learn(peer_id, api)
            if self.redial and me < peer_id and not self.service.is_dialing(peer_id):
                self.service.spawn(self._exchange_dial(relay, peer_id), name=f"exchange {peer_id[:12]}")

    async def _exchange_dial(self, relay: Peer, peer_id: str) -> None:
        try:
            await self.service.connect_via(relay, peer_id)
        except MeshError as exc:
            logger.info("peer exchange dial to %s via %s failed: %s", peer_id[:12], relay.peer_id[:12], exc)

    async def _on_signal(self, relay: Peer, frame: p.ControlFrame) -> None:
        """Forward a relayed offer/answer, or answer an offer addressed to this node, or hand an answer to
        the dial waiting for it. The signal itself is verified by its addressee, never by a relay."""
        body = frame.body
        op, target, signal = body.get("op"), body.get("to"), body.get("signal")
        if op not in ("offer", "answer", "refused") or not isinstance(target, str):
            raise p.ProtocolError("malformed signal frame")
        if target != self.service.identity.peer_id:
            next_hop = self.service.peers.get(target)
            if next_hop is None or not next_hop.is_open or next_hop is relay:
                if op == "offer" and isinstance(signal, dict):
                    reply = {
                        "op": "refused",
                        "to": relay.peer_id,
                        "re": signal.get("nonce"),
                        "reason": "no route",
                        "code": "no_route",
                    }
                    await relay.notify("signal", reply)
                return
            await next_hop.notify("signal", {**body, "via": relay.peer_id})
            return
        if op == "offer":
            try:
                answer = await self.service.handle_offer(signal)
                reply = {"op": "answer", "to": str(signal.get("from")), "signal": answer}
            except SignallingError as exc:
                reply = {
                    "op": "refused",
                    "to": str(signal.get("from")) if isinstance(signal, dict) else "",
                    "re": signal.get("nonce") if isinstance(signal, dict) else None,
                    "reason": str(exc)[:300],
                    "code": exc.code,
                }
            await relay.notify("signal", reply)
            return
        nonce = signal.get("re") if op == "answer" and isinstance(signal, dict) else body.get("re")
        future = self.service.relay_answers.get(nonce) if isinstance(nonce, str) else None
        if future is not None and not future.done():
            if op == "answer":
                future.set_result(signal)
            else:
                code = body.get("code") if isinstance(body.get("code"), str) else "refused"
                future.set_exception(
                    JoinRefused(f"refused: {body.get('reason')!s:.200}", code[:40], relay.peer_id)
                )

    # ----- mDNS ------------------------------------------------------------------------------------------

    def _mdns_address(self) -> str | None:
        address = self.service.advertise_address
        if not address:
            return None
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        return None if ip.is_unspecified or ip.version != 4 else str(ip)

    async def _start_mdns(self) -> None:
        from zeroconf import IPVersion, ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        for _ in range(300):  # the node learns its API address only once it listens
            if self.service.advertise_address:
                break
            await asyncio.sleep(0.1)
        ip = self._mdns_address()
        if ip is None or not self.service.membership.active:
            logger.info("mdns off: no IPv4 API address or mesh to announce")
            self._mdns_starting = False
            return
        me = self.service.identity.peer_id
        port = int(self.service.advertise_address.rsplit(":", 1)[1])
        try:
            mdns = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
        except OSError as exc:
            logger.info("mdns unavailable on %s: %s", ip, exc)
            self._mdns_starting = False
            return
        self._mdns = mdns
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{me[:20]}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(ip)],
            port=port,
            properties={"id": me, "mesh": self.service.membership.mesh_id},
        )

        def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            if state_change is ServiceStateChange.Added:
                self.service.spawn(self._resolve(mdns, service_type, name), name="mdns resolve")

        self._browser = AsyncServiceBrowser(mdns.zeroconf, SERVICE_TYPE, handlers=[on_change])
        try:
            # The first await queues the registration; the second waits for its probes and announcements,
            # so an update (a rotation) never races the announcements of the first registration.
            await (await mdns.async_register_service(info))
        except (OSError, RuntimeError) as exc:
            logger.info("mdns registration failed: %s", exc)
            return
        self._mdns_info = info
        if info.properties.get(b"mesh") != self.service.membership.mesh_id.encode():
            await self.mesh_changed()  # the mesh changed while registering

    async def _resolve(self, mdns: Any, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(mdns.zeroconf, 3000):
            return
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        peer_id, mesh_id = props.get("id", ""), props.get("mesh", "")
        if mesh_id != self.service.membership.mesh_id or peer_id == self.service.identity.peer_id:
            return
        try:
            public_key_from_peer_id(peer_id)
        except IdentityError:
            return
        addresses = info.parsed_addresses()
        if addresses and info.port:
            logger.info("mdns: found %s at %s:%s", peer_id[:12], addresses[0], info.port)
            self._learn(peer_id, f"{addresses[0]}:{info.port}")
