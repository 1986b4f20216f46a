"""The stage node's side of a chain (docs/split.md, *A chain instead of the star*): what a `stage.open` says
of the stages around it, and the node's own direct tensor links to the next stages, over which it passes a
chain's decode steps on.

A chain is asked for by the origin: `stage.open` at c names `from` (b may feed this sequence `forward`
frames; c answers with the `feed` id b is to name it by), then `stage.open` at b names `next` {peer c, that
feed id}. b links to c as any origin links to a
stage — a `tensor.link` grant over the mesh's encrypted control channel, then the sealed TCP handshake — and
keeps one link per next peer, shared by every chained sequence (b's worker is the only writer; c reads
records back to back: `tensor_link.RecordStream`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from shoal.mesh.p2p.protocol import BinaryFrame
from shoal.mesh.split import wire
from shoal.mesh.split.hosted import HostError
from shoal.mesh.split.tensor_link import LinkError, TensorLinkClient

logger = logging.getLogger(__name__)

Connect = Callable[[str], Awaitable[TensorLinkClient]]
"""Open a direct tensor link to a peer (its grant, then the handshake); raises LinkError."""
MAX_PEER_ID = 128


@dataclass(frozen=True)
class ChainPlace:
    """Where a hosted sequence sits in its chain."""

    upstream: str | None = None
    """The peer that may feed it `forward` frames (the stage before it), if any."""
    next_peer: str | None = None
    """The peer of the stage it passes its output to, if any."""
    next_seq: int = 0
    """The sequence's id at the next stage."""


def parse_place(body: dict[str, Any]) -> ChainPlace:
    """The `from` and `next` of a `stage.open` body; raises HostError (bad_request)."""
    upstream, after = body.get("from"), body.get("next")
    if upstream is not None and not _peer_id(upstream):
        raise HostError(wire.BAD_REQUEST, "stage.open from must be a peer id")
    if after is None:
        return ChainPlace(upstream)
    if not isinstance(after, dict) or not _peer_id(after.get("peer")):
        raise HostError(wire.BAD_REQUEST, "stage.open next must be {peer, seq}")
    seq = after.get("seq")
    if type(seq) is not int or not 0 <= seq < 2**32:
        raise HostError(wire.BAD_REQUEST, "stage.open next.seq must be a u32")
    return ChainPlace(upstream, after["peer"], seq)


def _peer_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_PEER_ID and value.isalnum()


class NextLinks:
    """This node's direct tensor links to the next stages of chains, one per peer: opened on the loop when a
    `stage.open` names a next stage, written by the stage worker."""

    def __init__(self, connect: Connect | None) -> None:
        """`connect`: how to open a link to a peer; None: this node never chains (it answers the origin)."""
        self._connect = connect
        self._links: dict[str, TensorLinkClient] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def ensure(self, peer: str) -> bool:
        """Whether a link to `peer` is open (opening one if needed); False when it cannot be."""
        if self._connect is None:
            return False
        async with self._opening.setdefault(peer, asyncio.Lock()):
            link = self._links.get(peer)
            if link is not None and link.usable_one_way():
                return True
            try:
                self._links[peer] = await self._connect(peer)
            except LinkError as exc:
                logger.info("no chain link to %s (%s): its steps go through the origin", peer[:12], exc)
                return False
        logger.info("chain link to %s", peer[:12])
        return True

    def send(self, peer: str, frame: BinaryFrame) -> None:
        """Worker thread: pass a step on to `peer`; raises LinkError (then the link is forgotten)."""
        link = self._link(peer)
        try:
            link.send(frame)
        except LinkError:
            self._forget(peer, link)
            raise

    def send_native(self, lane: ModuleType, peer: str, request_id: int, head: bytes, step: int,
                    values: np.ndarray) -> None:
        """`send` of a steady step through the native lane (`split.step_lane`); raises LinkError."""
        link = self._link(peer)
        try:
            link.send_native(lane, request_id, head, step, values)
        except LinkError:
            self._forget(peer, link)
            raise

    def _link(self, peer: str) -> TensorLinkClient:
        link = self._links.get(peer)
        if link is None:
            raise LinkError("no link to the next stage")
        return link

    def _forget(self, peer: str, link: TensorLinkClient) -> None:
        if self._links.get(peer) is link:
            del self._links[peer]

    def drop(self, peer: str) -> None:
        """Close the link to a peer that left."""
        link = self._links.pop(peer, None)
        if link is not None:
            link.close()

    def close(self) -> None:
        for peer in list(self._links):
            self.drop(peer)
