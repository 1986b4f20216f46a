"""One link to one peer: an `RTCPeerConnection` with three pre-negotiated data channels (`control` id 0,
`blocks` id 1, `tensors` id 2), back-pressure-aware sends, heartbeats with RTT, dead-link detection, requests
with replies and timeouts, and an abuse counter.

Channels are created with `negotiated=True` on both sides before the offer/answer, so their message
handlers are attached before any byte can arrive (no `datachannel` event race).

Request ids: the offering side uses odd ids, the answering side even ones, so a binary frame whose id has our
parity is a reply to us and one with the peer's parity is a request for us.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection
from shoal.mesh.p2p import aiortc_tuning
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.errors import LinkClosed, ProtocolError, RemoteError, RequestTimeout
from shoal.mesh.p2p.ice import link_path, remote_addresses
from shoal.mesh.p2p.link_shared import (
    BinaryHandler,
    ControlHandler,
    Handlers,
    HandlerSlots,
    LinkOffer,
    LinkSettings,
)

__all__ = ["BinaryHandler", "ControlHandler", "Handlers", "LinkSettings", "Peer"]
logger = logging.getLogger(__name__)


class Peer:
    """A link to one remote node. Create with `Peer.create`, then run the offer/answer, then `start()`."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        peer_id: str,
        name: str,
        offerer: bool,
        settings: LinkSettings,
        handlers: Handlers,
        on_closed: Callable[[Peer, str], None],
        on_abuse: Callable[[Peer, str], None],
    ) -> None:
        self.pc = pc
        self.peer_id = peer_id
        self.name = name
        self.offerer = offerer
        self.settings = settings
        self.handlers = handlers
        self.api_address: str | None = None
        self.admitted: str | None = None
        """How the peer proved membership in signalling: `secret`, `invite` or `allow` (see `signalling`)."""
        self.advert: dict[str, Any] = {}
        self.rtt_s: float | None = None
        self.rtt_samples: list[float] = []
        self.connected_at: float | None = None
        self.last_seen = time.monotonic()
        self.abuse = 0
        self.state = "connecting"
        self.offer = LinkOffer()
        """The offer this link was made from (set by the dialer once signalling is done)."""
        self.close_reason: str | None = None
        self._on_closed = on_closed
        self._on_abuse = on_abuse
        self._ids = itertools.count(1 if offerer else 2, 2)
        self._pending_control: dict[int, asyncio.Future[p.ControlFrame]] = {}
        self._pending_binary: dict[int, asyncio.Future[p.BinaryFrame]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handler_slots = HandlerSlots(settings)
        self._opened = asyncio.Event()
        self._closed = asyncio.Event()
        self._peer_started = asyncio.Event()
        """Set by the peer's first ping (that end has started this link: made it its live one), or once the
        link closed (nothing left to wait for)."""
        self._drained = {name: asyncio.Event() for name in p.CHANNELS}
        self._reassemblers = {p.BLOCKS: p.Reassembler(p.BLOCKS), p.TENSORS: p.Reassembler(p.TENSORS)}
        self.channels: dict[str, RTCDataChannel] = {}
        for channel_name, channel_id in p.CHANNEL_IDS.items():
            channel = pc.createDataChannel(channel_name, negotiated=True, id=channel_id)
            channel.bufferedAmountLowThreshold = settings.low_water
            channel.on("message", self._message_handler(channel_name))
            channel.on("open", self._check_open)
            channel.on("close", lambda name=channel_name: self._spawn(self.close(f"{name} channel closed")))
            channel.on("bufferedamountlow", self._drained[channel_name].set)
            self.channels[channel_name] = channel
        pc.on("connectionstatechange", self._connection_state_changed)

    def identify(self, peer_id: str, name: str, api_address: str | None, admitted: str | None) -> None:
        """Who the link goes to, once signalling proved it (the verified offer or answer)."""
        self.peer_id, self.name, self.api_address, self.admitted = peer_id, name, api_address, admitted

    def advertised(self, advert: dict[str, Any]) -> dict[str, Any]:
        """Take the peer's newest (checked) advert; returns the one it replaces."""
        previous, self.advert = self.advert, advert
        return previous

    def holds_secret(self) -> None:
        """The peer now holds the mesh secret (this node handed it over or took it from the peer)."""
        self.admitted = "secret"

    # ----- lifecycle -------------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("peer %s: task failed", self.peer_id[:12], exc_info=task.exception())

    def _check_open(self) -> None:
        if all(c.readyState == "open" for c in self.channels.values()):
            self._opened.set()

    def _connection_state_changed(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self._spawn(self.close(f"connection {self.pc.connectionState}"))

    async def wait_open(self, timeout_s: float) -> None:
        self._check_open()
        try:
            async with asyncio.timeout(timeout_s):
                await self._opened.wait()
        except TimeoutError:
            raise LinkClosed(f"link to {self.peer_id[:12]} did not open within {timeout_s:.0f} s") from None

    def start(self) -> None:
        """Mark the link live and start heartbeats (call after `wait_open`)."""
        self.state = "connected"
        self.connected_at = time.time()
        self.last_seen = time.monotonic()
        self._spawn(self._heartbeat())
        self._announce_link()

    def _announce_link(self) -> None:
        """Tell the peer what SCTP packets this end can take (after enabling it, so that its larger packets,
        sent only once it has read this, are readable here); see `mesh.aiortc_tuning`."""
        receivable = aiortc_tuning.enable_large_receive(self.pc)
        if receivable:
            body = {"max_packet": receivable, "mtu": aiortc_tuning.local_path_mtu(self.pc)}
            self._spawn(self._send_quietly(p.ControlFrame("link", body)))

    def _on_link(self, body: dict[str, Any]) -> None:
        max_packet, mtu = body.get("max_packet"), body.get("mtu")
        if type(max_packet) is not int or type(mtu) is not int or max_packet < 0 or mtu < 0:
            raise ProtocolError("a link frame needs non-negative integers max_packet and mtu")
        size = aiortc_tuning.large_packet_size(max_packet, aiortc_tuning.local_path_mtu(self.pc), mtu)
        chunk = aiortc_tuning.enable_large_send(self.pc, size) if size else 0
        if chunk:
            logger.info("peer %s: sending SCTP chunks of %d bytes", self.peer_id[:12], chunk)

    @property
    def is_open(self) -> bool:
        return self.state == "connected" and not self._closed.is_set()

    async def close(self, reason: str = "closed") -> None:
        """Close the link (idempotent): fail pending requests, stop tasks, close the connection."""
        if self.state == "closed":
            await self._closed.wait()
            return
        previous, self.state, self.close_reason = self.state, "closed", reason
        logger.info("peer %s (%s): link closed: %s", self.peer_id[:12], self.name, reason)
        for future in [*self._pending_control.values(), *self._pending_binary.values()]:
            if not future.done():
                future.set_exception(LinkClosed(f"link to {self.peer_id[:12]} closed: {reason}"))
        self._pending_control.clear()
        self._pending_binary.clear()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        try:
            await self.pc.close()
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)
            for reassembler in self._reassemblers.values():
                reassembler.clear()
            self._closed.set()
            self._peer_started.set()
            if previous == "connected":
                self._on_closed(self, reason)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def wait_peer_started(self) -> None:
        """Until the peer's heartbeat arrives on this link (that end started it too) or the link closes."""
        await self._peer_started.wait()

    # ----- sending ---------------------------------------------------------------------------------------

    async def _send_raw(self, channel_name: str, data: bytes | str) -> None:
        channel = self.channels[channel_name]
        while channel.bufferedAmount > self.settings.high_water:
            if channel.readyState != "open" or self.state == "closed":
                break
            event = self._drained[channel_name]
            event.clear()
            try:
                async with asyncio.timeout(self.settings.dead_timeout_s):
                    await event.wait()
            except TimeoutError:
                if self.state == "closed":
                    break
        if channel.readyState != "open" or self.state == "closed":
            raise LinkClosed(f"link to {self.peer_id[:12]} is closed")
        channel.send(data)

    async def send_control(self, frame: p.ControlFrame) -> None:
        await self._send_raw(p.CONTROL, p.encode_control(frame))

    async def notify(self, frame_type: str, body: dict[str, Any]) -> None:
        """Send a control frame that expects no reply."""
        await self.send_control(p.ControlFrame(frame_type, body))

    async def request(self, frame_type: str, body: dict[str, Any], timeout_s: float | None = None) -> dict:
        """Send a control request and return the body of its reply; `RemoteError` if the peer said no."""
        request_id = next(self._ids)
        future: asyncio.Future[p.ControlFrame] = asyncio.get_running_loop().create_future()
        self._pending_control[request_id] = future
        try:
            await self.send_control(p.ControlFrame(frame_type, body, id=request_id))
            async with asyncio.timeout(timeout_s or self.settings.request_timeout_s):
                reply = await future
        except TimeoutError:
            raise RequestTimeout(f"{frame_type} to {self.peer_id[:12]} got no reply") from None
        finally:
            self._pending_control.pop(request_id, None)
        if reply.type == "error":
            code, message = reply.body.get("code", "error"), reply.body.get("message", "")
            raise RemoteError(str(code)[:64], str(message)[:500])
        return reply.body

    def new_request_id(self) -> int:
        return next(self._ids)

    async def send_binary(self, frame: p.BinaryFrame) -> None:
        """Send a binary frame (chunked as needed) on its kind's channel, honouring back-pressure."""
        channel_name = p.BINARY_KINDS[frame.kind][1]
        for message in p.encode_binary(frame, p.BINARY_MESSAGE):
            await self._send_raw(channel_name, message)

    async def request_binary(
        self, kind: int, meta: dict[str, Any], payload: bytes = b"", timeout_s: float | None = None
    ) -> p.BinaryFrame:
        """Send a binary request and await the binary frame that answers it (same request id)."""
        request_id = next(self._ids)
        future: asyncio.Future[p.BinaryFrame] = asyncio.get_running_loop().create_future()
        self._pending_binary[request_id] = future
        try:
            await self.send_binary(p.BinaryFrame(kind, request_id, meta, payload))
            async with asyncio.timeout(timeout_s or self.settings.request_timeout_s):
                return await future
        except TimeoutError:
            raise RequestTimeout(f"binary request {kind} to {self.peer_id[:12]} got no reply") from None
        finally:
            self._pending_binary.pop(request_id, None)

    # ----- receiving -------------------------------------------------------------------------------------

    def _message_handler(self, channel_name: str) -> Callable[[bytes | str], None]:
        def on_message(data: bytes | str) -> None:
            if self.state == "closed":
                return
            self.last_seen = time.monotonic()
            try:
                self.receive(channel_name, data)
            except ProtocolError as exc:
                self.strike(str(exc))

        return on_message

    def receive(self, channel_name: str, data: bytes | str) -> None:
        """Decode and dispatch one message the peer sent on `channel_name`; `ProtocolError` is the only
        exception peer input can cause here (handlers run as tasks and answer errors themselves)."""
        if channel_name == p.CONTROL:
            self._on_control(p.decode_control(data))
            return
        if not isinstance(data, bytes):
            raise ProtocolError(f"text message on binary channel {channel_name}")
        frame = self._reassemblers[channel_name].feed(data)
        if frame is not None:
            self._on_binary(frame)

    def strike(self, reason: str) -> None:
        """Count one protocol violation; answer with an error frame; past the limit, report abuse."""
        self.abuse += 1
        logger.warning(
            "peer %s (%s): protocol violation %d: %s", self.peer_id[:12], self.name, self.abuse, reason
        )
        if self.abuse == self.settings.abuse_limit:
            self._on_abuse(self, reason)
        elif self.abuse > self.settings.abuse_limit:
            return  # already reported; the link is closing
        elif self.is_open:
            frame = p.ControlFrame("error", {"code": "protocol", "message": reason[:500]})
            self._spawn(self._send_quietly(frame))

    async def _send_quietly(self, frame: p.ControlFrame) -> None:
        try:
            await self.send_control(frame)
        except (LinkClosed, ProtocolError):
            pass

    def _on_control(self, frame: p.ControlFrame) -> None:
        if frame.re is not None:
            future = self._pending_control.get(frame.re)
            if future is None:
                return  # a reply that came after its request timed out
            if frame.type not in ("reply", "error"):
                raise ProtocolError(f"a {frame.type} frame cannot answer a request")
            if not future.done():
                future.set_result(frame)
            return
        if frame.type == "ping":
            self._peer_started.set()
            self._spawn(self._send_quietly(p.ControlFrame("pong", frame.body)))
        elif frame.type == "pong":
            sent = frame.body.get("t")
            if isinstance(sent, float) and 0 <= time.monotonic() - sent < 3600:
                self.rtt_s = time.monotonic() - sent
                self.rtt_samples = [*self.rtt_samples[-63:], self.rtt_s]
        elif frame.type == "link":
            self._on_link(frame.body)
        elif frame.type == "error":
            logger.info("peer %s reports: %.200s", self.peer_id[:12], frame.body.get("message"))
        elif frame.type == "bye":
            self._spawn(self.close("peer said bye"))
        else:
            handler = self.handlers.control.get(frame.type)
            if handler is None:
                if frame.id is not None:
                    body = {"code": "unsupported", "message": frame.type}
                    self._spawn(self._send_quietly(p.ControlFrame("error", body, re=frame.id)))
                return
            self._handler_slots.admit()
            self._spawn(self._run_control_handler(handler, frame))

    async def _run_control_handler(self, handler: ControlHandler, frame: p.ControlFrame) -> None:
        try:
            async with self._handler_slots.run():
                body = await handler(self, frame)
            reply = p.ControlFrame("reply", body or {}, re=frame.id)
        except ProtocolError as exc:
            self.strike(str(exc))
            reply = p.ControlFrame("error", {"code": "protocol", "message": str(exc)[:500]}, re=frame.id)
        except RemoteError as exc:
            reply = p.ControlFrame("error", {"code": exc.code, "message": exc.message[:500]}, re=frame.id)
        except LinkClosed:
            return
        except Exception:
            logger.exception("peer %s: %s handler failed", self.peer_id[:12], frame.type)
            reply = p.ControlFrame("error", {"code": "internal", "message": "handler failed"}, re=frame.id)
        if frame.id is not None:
            await self._send_quietly(reply)

    def _on_binary(self, frame: p.BinaryFrame) -> None:
        if frame.request_id % 2 == (1 if self.offerer else 0):
            future = self._pending_binary.get(frame.request_id)
            if future is not None and not future.done():
                future.set_result(frame)
            return
        handler = self.handlers.binary.get(frame.kind)
        if handler is None:
            raise ProtocolError(f"no handler for binary kind {frame.kind}")
        self._handler_slots.admit()
        self._spawn(self._run_binary_handler(handler, frame))

    async def _run_binary_handler(self, handler: BinaryHandler, frame: p.BinaryFrame) -> None:
        try:
            async with self._handler_slots.run():
                reply = await handler(self, frame)
                if reply is not None:
                    await self.send_binary(reply)
        except ProtocolError as exc:
            self.strike(str(exc))
        except LinkClosed:
            pass
        except Exception:
            logger.exception("peer %s: binary kind %d handler failed", self.peer_id[:12], frame.kind)

    # ----- liveness --------------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while self.state == "connected":
            if time.monotonic() - self.last_seen > self.settings.dead_timeout_s:
                self._spawn(self.close(f"dead: nothing heard for {self.settings.dead_timeout_s:.1f} s"))
                return
            await self._send_quietly(p.ControlFrame("ping", {"t": time.monotonic()}))
            await asyncio.sleep(min(interval, self.settings.dead_timeout_s / 4))

    @property
    def rtt_ms(self) -> float | None:
        return round(self.rtt_s * 1000, 3) if self.rtt_s is not None else None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.peer_id,
            "name": self.name,
            "kind": self.advert.get("kind", "node"),
            "api": self.api_address,
            "addresses": remote_addresses(self.pc),
            "path": link_path(self.pc),
            "state": self.state,
            "rtt_ms": self.rtt_ms,
            "connected_at": self.connected_at,
            "direction": "out" if self.offerer else "in",
            "abuse": self.abuse,
            "sctp_chunk": aiortc_tuning.large_send_chunk(self.pc),
            "advert": self.advert,
        }
