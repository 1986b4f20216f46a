"""Whole-request offload: a peer runs the request on its own engine and streams the tokens back on `control`.

Origin side (`OffloadClient.stream`): picks a request id `rid`, registers a queue for it, sends
`offload.open` {rid, model, prompt_ids, params, coalesce: true} and yields `OffloadEvent`s as `offload.token`
frames arrive, until `offload.done` (or `offload.error`, raised as `RemoteError`). A link that closes
mid-request raises `StageLost` (the router then re-plans and resumes from the tokens already streamed), and
so does a token frame that breaks the format. Closing the iterator early sends `offload.cancel`.

Serving side: `split.offload_server.OffloadServer`.

One frame per token while the sender keeps up; when it fell behind (its event loop was busy, or descheduled
on a loaded machine) and more tokens are already produced, an origin that sent `coalesce` gets them in the
same frame: `offload.token` then carries `more`, a list of the following tokens' bodies (same fields, indexes
in order, at most `MAX_COALESCED` tokens a frame, no logprobs). Each frame costs both nodes' event loops the
same Python whatever it carries (DTLS, SCTP, its SACK), so a backlog is caught up at a frame's cost, and no
token ever waits for another.

Where the peer's API address is reachable (`[split] direct_tensors` and `offload_link`), the frames of a
request (tokens, done, error) travel instead on a direct, sealed TCP link made for it (`split.offload_link`),
named in `offload.open` as `link`; a link that cannot be made leaves the request on the channel, one that
breaks before the first token has it opened again there, and one that breaks later is a lost peer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from shoal.mesh.p2p.errors import MeshError, RemoteError
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.protocol import ControlFrame
from shoal.mesh.split import offload_link, wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.liveness import Inbox, PeerSilent, Report, Watch, heard_from, next_reply, reporting
from shoal.mesh.split.offload_frames import OffloadEvent, token_events
from shoal.mesh.split.offload_link import TokenReceiver, link_host
from shoal.mesh.split.ports import MeshHandle
from shoal.mesh.split.receipts import Expected, ReceiptError, UsageLedger
from shoal.mesh.split.remote_stage import StageLost
from shoal.mesh.split.stage_link import DirectLinkFailures
from shoal.mesh.split.tensor_link import TENSOR_LINK, LinkError, Sealer

logger = logging.getLogger(__name__)

MAX_PROMPT_IDS = 16_384
_rids = itertools.count(int.from_bytes(os.urandom(3), "little") << 4)


class LinkBroke(StageLost):
    """A request's direct link ended (closed, reset) before its done: before its first token the request is
    opened again on the data channel."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(peer, reason)
        self.reason = reason


class OffloadClient:
    """The origin's half. Needs the mesh service (`peer()`, `on_control()`, `add_peer_listener()`)."""

    def __init__(self, mesh: MeshHandle, *, open_timeout_s: float = SplitConfig.offload_open_timeout_s,
                 token_timeout_s: float = SplitConfig.offload_token_timeout_s,
                 ledger: UsageLedger | None = None, settings: SplitConfig | None = None) -> None:
        """`settings`: when a silent peer is pinged, and lost (`split.liveness`); whether and how tokens
        come over direct links (`direct_tensors`, `offload_link`, the `link_*` timeouts)."""
        self._mesh = mesh
        self._open_timeout = open_timeout_s
        self._token_timeout = token_timeout_s
        self._settings = settings = settings or SplitConfig()
        self._watch = Watch.from_config(settings)
        self._direct = settings.direct_tensors and settings.offload_link
        self._failures = DirectLinkFailures(settings.direct_retry_s)
        self.tokens_over = {"direct": 0, "channel": 0}
        """Tokens received, by how they came (`GET /v1/mesh/route`)."""
        self._ledger = ledger
        self._queues: dict[tuple[str, int], Inbox[ControlFrame | BaseException]] = {}
        self._seen: dict[tuple[str, int], _Seen] = {}
        """What this node saw of each offloaded request until its `offload.done` (the receipt is checked
        against it): kept past `stream()`, which returns at the finish token, before the done frame."""
        for frame_type in (wire.OFFLOAD_TOKEN, wire.OFFLOAD_DONE, wire.OFFLOAD_ERROR):
            mesh.on_control(frame_type, self._on_frame)
        mesh.add_peer_listener(self._on_peer)

    async def _on_frame(self, peer: Peer, frame: ControlFrame) -> None:
        self._deliver(peer, frame, "channel")
        return None

    def _deliver(self, peer: Peer, frame: ControlFrame, over: str) -> None:
        """A frame of an offloaded request, from the data channel or its direct link (`over`)."""
        rid = frame.body.get("rid")
        if type(rid) is not int:
            return None
        key = (peer.peer_id, rid)
        seen = self._seen.get(key)
        if frame.type == wire.OFFLOAD_TOKEN:
            more = frame.body.get("more")
            self.tokens_over[over] += 1 + (len(more) if isinstance(more, list) else 0)
        if seen is not None:
            if frame.type == wire.OFFLOAD_TOKEN:
                more = frame.body.get("more")
                seen.tokens_out += 1 + (len(more) if isinstance(more, list) else 0)
            else:
                del self._seen[key]
                receipt = frame.body.get("receipt")
                if frame.type == wire.OFFLOAD_DONE and receipt is not None and self._ledger is not None:
                    self._mesh.spawn(self._countersign(peer, rid, seen, receipt), name=f"receipt {rid}")
        queue = self._queues.get(key)
        if queue is not None:
            queue.put(frame)
        return None

    async def _countersign(self, peer: Peer, rid: int, seen: _Seen, receipt: Any) -> None:
        """Check the server's receipt against what this node saw, countersign and keep it, send it back."""
        if self._ledger is None:
            return
        usage = receipt.get("usage") if isinstance(receipt, dict) else None
        model = usage.get("model") if isinstance(usage, dict) else None
        expected = Expected(peer.peer_id, str(rid), "offload", model if model in seen.models else seen.model,
                            seen.tokens_in, seen.tokens_out)
        try:
            signed = await self._ledger.countersign(expected, receipt)
            await peer.request(wire.OFFLOAD_RECEIPT, {"receipt": signed.to_dict()})
        except (ReceiptError, MeshError) as exc:
            logger.warning("offload %d: receipt from %s not countersigned: %s", rid, peer.peer_id[:12], exc)

    def _on_peer(self, event: str, peer: Peer) -> None:
        if event != "left":
            return
        for key in [k for k in self._seen if k[0] == peer.peer_id]:
            del self._seen[key]
        for (peer_id, _), queue in list(self._queues.items()):
            if peer_id == peer.peer_id:
                queue.put(StageLost(peer_id, f"link closed: {peer.close_reason or 'gone'}"))

    async def stream(self, peer_id: str, model: str, prompt_ids: list[int], params: dict[str, Any],
                     cid: str | None = None, on_wait: Callable[[str, float], None] | None = None
                     ) -> AsyncIterator[OffloadEvent]:
        """`cid`: the model's CID where this node knows it (a receipt may name the model by either).
        `on_wait(what, seconds)`: told each second while the peer opens (`open`: it may load the model) or
        has sent no token yet (`first_token`)."""
        direct = self._direct
        while True:
            attempt = self._attempt(peer_id, model, prompt_ids, params, cid, on_wait, direct)
            try:
                async with contextlib.aclosing(attempt) as events:
                    async for event in events:
                        yield event
                return
            except LinkBroke as exc:  # before the first token: the same request on the data channel
                try:
                    peer = self._mesh.peer(peer_id)
                except MeshError:
                    raise StageLost(peer_id, exc.reason) from None
                if not direct or not await heard_from(peer, self._watch.probe_timeout_s):
                    raise StageLost(peer_id, exc.reason) from None
                logger.info("offload to %s: %s before the first token; on the data channel now",
                            peer_id[:12], exc.reason)
                direct = False

    async def _attempt(self, peer_id: str, model: str, prompt_ids: list[int], params: dict[str, Any],
                       cid: str | None, on_wait: Callable[[str, float], None] | None, direct: bool
                       ) -> AsyncGenerator[OffloadEvent, None]:
        rid = next(_rids) % 2**32
        key = (peer_id, rid)
        queue: Inbox[ControlFrame | BaseException] = Inbox()
        self._queues[key] = queue
        self._seen[key] = _Seen(model, frozenset(m for m in (model, cid) if m), len(prompt_ids))
        while len(self._seen) > MAX_SEEN:
            self._seen.pop(next(iter(self._seen)))
        finished = False
        receiver: TokenReceiver | None = None
        try:
            try:
                peer = self._mesh.peer(peer_id)
                body = {"rid": rid, "model": model, "prompt_ids": list(prompt_ids), "params": params,
                        "coalesce": True}
                receiver = await self._link(peer, rid, queue) if direct else None
                if receiver is not None:
                    body["link"] = receiver.lid
                opened: Report | None = (lambda s: on_wait("open", s)) if on_wait is not None else None
                reply = await reporting(peer.request(wire.OFFLOAD_OPEN, body, self._open_timeout), opened)
            except RemoteError:
                raise
            except MeshError as exc:
                raise StageLost(peer_id, str(exc)) from None
            if receiver is not None and not (isinstance(reply, dict) and reply.get("link") is True):
                receiver.close()  # the peer did not take it (an older node?): the tokens come on the channel
                receiver = None
                self._failures.failed(peer_id, link_host(peer) or "")
            index = 0
            clock = self._watch.clock()
            while True:
                try:  # a killed peer is found by its silence and an unanswered ping, well before heartbeats
                    first: Report | None = (lambda s: on_wait("first_token", s)) \
                        if on_wait is not None and index == 0 else None
                    # a token that comes before its silence is suspect costs one future: no task or timer
                    item = await next_reply(queue, peer, clock, self._watch.probe_timeout_s,
                                            self._token_timeout, first)
                except TimeoutError:
                    raise StageLost(peer_id, f"no token for {self._token_timeout:.0f} s") from None
                except PeerSilent as exc:
                    raise StageLost(peer_id, str(exc)) from None
                if isinstance(item, LinkBroke) and index > 0:
                    raise StageLost(peer_id, item.reason)
                if isinstance(item, BaseException):
                    raise item
                body = item.body
                if item.type == wire.OFFLOAD_ERROR:
                    finished = True
                    raise RemoteError(str(body.get("code", "error"))[:64], str(body.get("message", ""))[:500])
                if item.type == wire.OFFLOAD_DONE:
                    finished = True
                    return
                events = token_events(body, index, params.get("stop") or ())
                if events is None:
                    raise StageLost(peer_id, "sent a malformed token frame")
                index += len(events)
                for event in events:
                    if event.finish_reason is not None:
                        finished = True
                    yield event
                if finished:
                    return
        finally:
            self._queues.pop(key, None)
            queue.close()
            if not finished:
                self._seen.pop(key, None)
                if receiver is not None:
                    receiver.close()
                with contextlib.suppress(MeshError):
                    await self._mesh.peer(peer_id).notify(wire.OFFLOAD_CANCEL, {"rid": rid})
            elif receiver is not None:
                receiver.expect_end(self._token_timeout)  # its done (and receipt) still comes on the link

    def links_to(self, peer: Peer) -> bool:
        """Whether an offload to `peer` would try a direct link now (the planner's `Device.offload_link`):
        links are on here, the peer has an API address, and no link to it failed within `direct_retry_s`."""
        host = link_host(peer) if self._direct else None
        return host is not None and not self._failures.recent(peer.peer_id, host)

    async def _link(self, peer: Peer, rid: int, queue: Inbox[ControlFrame | BaseException]
                    ) -> TokenReceiver | None:
        """A direct link for request `rid`'s frames (`split.offload_link`), or None: the data channel."""
        host = link_host(peer)
        if host is None or self._failures.recent(peer.peer_id, host):
            return None

        def lost(reason: str, malformed: bool) -> None:
            kind = StageLost if malformed else LinkBroke
            queue.put(kind(peer.peer_id, reason))

        settings = self._settings
        try:
            grant = await peer.request(TENSOR_LINK, {"for": offload_link.PURPOSE}, settings.control_timeout_s)
            lid = grant.get("lid") if isinstance(grant, dict) else None
            if type(lid) is not int or not 0 <= lid < 2**32:
                raise LinkError("the grant names no link id")

            def receiver_for(sealer: Sealer) -> TokenReceiver:
                return TokenReceiver(sealer, rid, lambda f: self._deliver(peer, f, "direct"), lost)

            receiver = await offload_link.connect(host, grant, receiver_for,
                                                  settings.link_handshake_timeout_s,
                                                  settings.link_record_timeout_s)
        except LinkError as exc:
            logger.info("no offload link to %s at %s (%s); using the data channel", peer.peer_id[:12], host,
                        exc)
            self._failures.failed(peer.peer_id, host)
            return None
        except MeshError as exc:  # refused, or no listener there: the channel (and no new ask for a while)
            logger.debug("no offload link to %s: %s", peer.peer_id[:12], exc)
            if isinstance(exc, RemoteError):
                self._failures.failed(peer.peer_id, host)
            return None
        self._failures.connected(peer.peer_id, host)
        receiver.lid = lid
        return receiver


MAX_SEEN = 1024
"""Offloaded requests whose `offload.done` a client still waits for (oldest forgotten first)."""


@dataclass
class _Seen:
    """What the origin saw of one offloaded request."""

    model: str
    models: frozenset[str]
    """Names the receipt may give the model by: the requested name, its CID."""
    tokens_in: int
    tokens_out: int = 0


def params_to_wire(params: Any, max_tokens: int | None = None) -> dict[str, Any]:
    """`SamplingParams` as the `params` object of `offload.open` (optionally with a new max_tokens)."""
    body = dataclasses.asdict(params)
    body["stop"] = list(body.get("stop") or ())
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body
