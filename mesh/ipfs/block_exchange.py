"""Blocks over the mesh: serve blocks from this node's store on the `blocks` channel, and `MeshBlockSource`,
the IPFS layer's "mesh peers" source, which asks connected peers for a block.

For each block the source picks the connected peer with the fewest requests in flight (so many concurrent
`get_block` calls spread over several peers), and prefers that peer's HTTP gateway
(`http://API/ipfs/{cid}?format=raw`, through the IPFS layer's `GatewaySource`) when the peer advertises one
and it is reachable — much faster than aiortc's pure-Python SCTP — falling back to the data channel. It is
also a `CarSource`: `stream_car(root)` streams a whole DAG from one peer's gateway, which the fetcher tries
first (received by `ipfs.http_stream` straight into large buffers, not through aiohttp). Every block is
verified against its CID (`get_block` here, the fetcher for CAR streams); a peer that sends a wrong block
gets a strike.

The node wires it: `BlockExchange(mesh, store)` registers the `block_want` handler on the mesh service (a
`MeshLinks`: what the exchange needs of it) and the gateway advert fields; `source()` is the IPFS source.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
from multiformats import CID
from shoal.mesh.ipfs.cid import parse_cid, verify_block
from shoal.mesh.ipfs.errors import (
    BlockNotFoundError,
    GatewayUnreachableError,
    InvalidCidError,
    SourceError,
    StoreError,
    VerificationError,
)
from shoal.mesh.ipfs.sources import GatewaySource
from shoal.mesh.ipfs.store import BlockStore
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.errors import MeshError
from shoal.mesh.p2p.gossip import Gossip
from shoal.mesh.p2p.peer import BinaryHandler, Peer

logger = logging.getLogger(__name__)
HTTP_RETRY_S = 60.0
MAX_ROOTS = 256


class MeshLinks(Protocol):
    """What the block exchange needs of the mesh service (`shoal.mesh.p2p.service.MeshService`)."""

    @property
    def config(self) -> MeshConfig: ...

    @property
    def gossip(self) -> Gossip: ...

    @property
    def session(self) -> aiohttp.ClientSession: ...

    def on_binary(self, kind: int, handler: BinaryHandler) -> None: ...

    def connected_peers(self) -> list[Peer]: ...


class BlockExchange:
    """Serves `block_want` requests from `store` (none: answers every want with `block_missing`) and
    advertises this node's gateway and pinned roots."""

    def __init__(self, service: MeshLinks, store: BlockStore | None = None) -> None:
        self.service = service
        self.store = store
        self.served = 0
        self._roots: list[str] = []
        self._roots_read = 0.0
        service.on_binary(p.BLOCK_WANT, self._on_want)
        if store is not None:
            service.gossip.update(gateway=True)
            service.gossip.add_provider(self._held_roots)

    def _held_roots(self) -> dict[str, Any]:
        """The pinned DAG roots of the store, for adverts (re-read at most every 5 s)."""
        now = time.monotonic()
        if now - self._roots_read > 5.0:
            self._roots_read = now
            try:
                self._roots = sorted(self.store.pins())[:MAX_ROOTS] if self.store is not None else []
            except StoreError as exc:
                logger.warning("cannot list pinned roots: %s", exc)
        extra = [root for root in self.service.gossip.fields.get("roots", []) if root not in self._roots]
        return {"roots": [*self._roots, *extra][:MAX_ROOTS]}

    def source(self, **kwargs: Any) -> MeshBlockSource:
        return MeshBlockSource(self.service, **kwargs)

    async def _on_want(self, peer: Peer, frame: p.BinaryFrame) -> p.BinaryFrame:
        text = frame.meta.get("cid")
        if not isinstance(text, str):
            raise p.ProtocolError("block_want needs a 'cid' string")
        try:
            cid = parse_cid(text)
        except InvalidCidError as exc:
            raise p.ProtocolError(str(exc)) from None
        store = self.store
        data = None
        if store is not None:
            try:
                data = await asyncio.to_thread(store.get, cid)
            except StoreError as exc:
                logger.warning("cannot serve %s to %s: %s", cid, peer.peer_id[:12], exc)
        if data is None:
            return p.BinaryFrame(p.BLOCK_MISSING, frame.request_id, {"cid": text}, b"")
        self.served += 1
        return p.BinaryFrame(p.BLOCK, frame.request_id, {"cid": text}, data)


class MeshBlockSource:
    """A `BlockSource` ("mesh peers") over the node's links. Raises `BlockNotFoundError`/`SourceError`."""

    def __init__(
        self,
        service: MeshLinks,
        *,
        prefer_http: bool = True,
        attempts: int = 3,
        timeout_s: float | None = None,
        name: str = "mesh peers",
        only: set[str] | None = None,
        direct_car: bool = True,
    ) -> None:
        self.service = service
        self.prefer_http = prefer_http
        self.attempts = attempts
        self.timeout_s = timeout_s or service.config.request_timeout_s
        self.name = name
        self.only = only
        """If set, ask only these peer ids (benchmarks, trusted-only policies)."""
        self.direct_car = direct_car
        """Receive CAR streams from peers' gateways with `http_stream` (see `GatewaySource`), not aiohttp."""
        self.in_flight: Counter[str] = Counter()
        self.http_down_until: dict[str, float] = {}
        self.stats: Counter[str] = Counter()

    def _candidates(self) -> list[Peer]:
        peers = [p for p in self.service.connected_peers() if self.only is None or p.peer_id in self.only]
        return sorted(peers, key=lambda peer: (self.in_flight[peer.peer_id], peer.rtt_s or 1.0))

    async def get_block(self, cid: CID) -> bytes:
        candidates = self._candidates()
        if not candidates:
            raise SourceError(f"{self.name}: no connected peers")
        errors: list[str] = []
        for peer in candidates[: self.attempts]:
            self.in_flight[peer.peer_id] += 1
            try:
                data = await self._from_peer(peer, cid)
            except BlockNotFoundError as exc:
                errors.append(str(exc))
                continue
            except (MeshError, SourceError, TimeoutError) as exc:
                errors.append(f"{peer.peer_id[:12]}: {exc}")
                continue
            finally:
                self.in_flight[peer.peer_id] -= 1
            try:
                verify_block(cid, data)
            except VerificationError as exc:
                peer.strike(f"sent a block that does not match {cid}")
                errors.append(str(exc))
                continue
            return data
        if all("not found" in e or "does not have" in e for e in errors):
            raise BlockNotFoundError(f"{self.name}: no peer has {cid}")
        raise SourceError(f"{self.name}: {'; '.join(errors)[:500]}")

    def _http_base(self, peer: Peer) -> str | None:
        api = peer.advert.get("api") or peer.api_address
        if not self.prefer_http or not peer.advert.get("gateway") or not isinstance(api, str) or not api:
            return None
        if self.http_down_until.get(peer.peer_id, 0.0) > time.monotonic():
            return None
        return f"http://{api}"

    def _gateway(self, peer: Peer) -> GatewaySource | None:
        base = self._http_base(peer)
        if base is None:
            return None
        return GatewaySource(base, self.service.session, self.timeout_s, direct_car=self.direct_car)

    def _mark_http_down(self, peer: Peer, exc: BaseException) -> None:
        logger.info("gateway of %s unreachable (%s); using the data channel", peer.peer_id[:12], exc)
        self.http_down_until[peer.peer_id] = time.monotonic() + HTTP_RETRY_S

    async def _from_peer(self, peer: Peer, cid: CID) -> bytes:
        gateway = self._gateway(peer)
        if gateway is not None:
            try:
                data = await gateway.get_block(cid)
                self.stats["http"] += 1
                return data
            except SourceError as exc:  # unreachable, refused (e.g. 401 behind an API key), timed out
                self._mark_http_down(peer, exc)
        reply = await peer.request_binary(p.BLOCK_WANT, {"cid": str(cid)}, timeout_s=self.timeout_s)
        if reply.kind == p.BLOCK_MISSING:
            raise BlockNotFoundError(f"{peer.peer_id[:12]} does not have {cid}")
        if reply.kind != p.BLOCK:
            peer.strike(f"answered block_want with kind {reply.kind}")
            raise SourceError(f"{peer.peer_id[:12]}: unexpected reply")
        self.stats["channel"] += 1
        return reply.payload

    async def stream_car(self, root: CID) -> AsyncIterator[tuple[CID, bytes]]:
        """The DAG under `root` as one CAR stream from a peer's gateway (unverified: the fetcher verifies),
        preferring a peer that advertises `root`. Raises `SourceError` when no peer's gateway can serve it."""
        peers = self._candidates()
        holders = [peer for peer in peers if str(root) in peer.advert.get("roots", [])]
        errors: list[str] = []
        for peer in [*holders, *(peer for peer in peers if peer not in holders)][: self.attempts]:
            gateway = self._gateway(peer)
            if gateway is None:
                continue
            started = False
            try:
                async for item in gateway.stream_car(root):
                    started = True
                    yield item
            except SourceError as exc:
                if started:
                    raise  # a broken stream: the fetcher walks the DAG for what is missing
                if isinstance(exc, GatewayUnreachableError):  # its blocks too: the channel, at once
                    self._mark_http_down(peer, exc)
                errors.append(str(exc))
                continue
            self.stats["car"] += 1
            return
        raise SourceError(f"{self.name}: no peer gateway streamed {root} ({'; '.join(errors)[:300]})")
