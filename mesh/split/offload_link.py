"""An offload's tokens over a direct tensor link: the serving node writes `offload.token` / `offload.done` /
`offload.error` as sealed records on a TCP connection instead of the control data channel, whose every frame
costs both nodes' event loops aiortc's pure-Python DTLS and SCTP (and a SACK back).

The link is made exactly as a split stage's (`split.tensor_link`): over the WebRTC control channel the origin
asks `tensor.link` {"for": "offload"}; the serving node answers {port, token, key, lid} — a one-use token
(`[split] link_token_ttl_s`), a fresh AES-256-GCM key, and `lid`, the id the link is claimed by. The origin
connects to the host of the peer's API address, shows the token and reads the sealed empty record; the
serving node keeps the authenticated link (`TensorLinkServer.claim`) until the origin's `offload.open` names
it (`"link": lid`): one link per request. When the node took it, the open's reply says `"link": true` and
every frame of the request goes over it, in order (a done never overtakes a token), after which the serving
node closes it. Otherwise (no listener, no API address, a refused grant, a connection that fails, a link not
claimed) the request runs on the data channel as before.

Records: `u32 LE length` + AES-GCM(key, nonce = direction ‖ counter) — `tensor_link.Sealer`, so a record
cannot be replayed, reordered or reflected — of `u32 rid` + `u8 kind` (1 token, 2 done, 3 error) + the
frame's JSON body, which must name the same `rid`. A body is bounded by its control frame's limit
(`offload.token` 6 KiB, ...), a record by the largest. A record that fails its tag, breaks a bound, names
another request or is not a JSON object ends the link: the origin counts the peer as lost (`StageLost`,
the router re-plans and resumes). The token bodies are then checked by `offload_frames.token_events`, as on
the channel. The origin sends nothing on the link (bytes from it end the link on the serving node).

Both ends run on their event loop through asyncio transports: a record is one `write` (a non-blocking
`send`), its arrival one `recv` — no thread hop, no Python SACK.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from shoal.mesh.p2p.protocol import CONTROL_LIMITS, ControlFrame
from shoal.mesh.split import wire
from shoal.mesh.split.tensor_link import LENGTH, TAG_BYTES, LinkError, Sealer

logger = logging.getLogger(__name__)

PURPOSE = "offload"
"""`tensor.link`'s body {"for": PURPOSE} asks for an offload link."""
KINDS = {1: wire.OFFLOAD_TOKEN, 2: wire.OFFLOAD_DONE, 3: wire.OFFLOAD_ERROR}
KIND_OF = {name: kind for kind, name in KINDS.items()}
RECORD_HEAD = struct.Struct("<IB")
MAX_BODY = {name: CONTROL_LIMITS[name] for name in KINDS.values()}
"""A body's bound: the limit of the control frame it stands for."""
MAX_PLAINTEXT = RECORD_HEAD.size + max(MAX_BODY.values())
MAX_RECORD = MAX_PLAINTEXT + TAG_BYTES
ENDS = (wire.OFFLOAD_DONE, wire.OFFLOAD_ERROR)


# --- records (pure) ---------------------------------------------------------------------------------------

def encode_record(rid: int, frame_type: str, body: dict[str, Any]) -> bytes:
    """A frame's plaintext; ValueError past its control frame's limit."""
    kind = KIND_OF.get(frame_type)
    if kind is None:
        raise ValueError(f"an offload link carries no {frame_type!r}")
    data = orjson.dumps(body)
    if len(data) > MAX_BODY[frame_type]:
        raise ValueError(f"{frame_type} body of {len(data)} bytes exceeds {MAX_BODY[frame_type]}")
    return RECORD_HEAD.pack(rid, kind) + data


def decode_record(plaintext: bytes, rid: int) -> ControlFrame:
    """The frame in a record of request `rid`; LinkError when it is not one (the peer broke the format)."""
    if len(plaintext) < RECORD_HEAD.size:
        raise LinkError("offload record shorter than its header")
    got, kind = RECORD_HEAD.unpack_from(plaintext)
    if got != rid:
        raise LinkError(f"offload record of request {got}, expected {rid}")
    frame_type = KINDS.get(kind)
    if frame_type is None:
        raise LinkError(f"offload record of unknown kind {kind}")
    data = plaintext[RECORD_HEAD.size:]
    if len(data) > MAX_BODY[frame_type]:
        raise LinkError(f"{frame_type} record of {len(data)} bytes is out of bounds")
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise LinkError(f"{frame_type} record is not JSON") from None
    if not isinstance(body, dict) or body.get("rid") != rid or type(body.get("rid")) is not int:
        raise LinkError(f"{frame_type} record body is not an object of request {rid}")
    return ControlFrame(frame_type, body)


class RecordReader:
    """Cuts a byte stream into sealed records and opens them in order (`Sealer` counts them: a replayed,
    reordered or reflected record fails its tag). Holds at most one unfinished record."""

    def __init__(self, sealer: Sealer, max_record: int = MAX_RECORD) -> None:
        self._sealer = sealer
        self._max = max_record
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The plaintexts of the records `data` completes; LinkError on a record out of bounds or one that
        fails its tag (the link is then done)."""
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        at = 0
        while len(buffer) - at >= LENGTH.size:
            (size,) = LENGTH.unpack_from(buffer, at)
            if not TAG_BYTES <= size <= self._max:
                raise LinkError(f"offload record of {size} bytes is out of bounds")
            end = at + LENGTH.size + size
            if end > len(buffer):
                break
            out.append(self._sealer.open(bytes(buffer[at + LENGTH.size:end])))
            at = end
        del buffer[:at]
        return out


class Addressed(Protocol):
    """What `link_host` needs of a link (`p2p.peer.Peer`)."""

    advert: dict[str, Any]
    api_address: str | None


def link_host(link: Addressed) -> str | None:
    """The host of the peer's API address (where its links listen), or None when it has none."""
    address = link.advert.get("api") or link.api_address
    if not isinstance(address, str) or ":" not in address:
        return None
    return address.rsplit(":", 1)[0].strip("[]")


# --- the origin's end -------------------------------------------------------------------------------------

class TokenReceiver(asyncio.Protocol):
    """Reads one request's frames off its link on the origin's loop: `deliver(frame)` for each, in order;
    `lost(reason, malformed)` once when the link ends before the request's done or error (`malformed`: a
    record broke the format)."""

    def __init__(self, sealer: Sealer, rid: int, deliver: Callable[[ControlFrame], None],
                 lost: Callable[[str, bool], None]) -> None:
        self._reader = RecordReader(sealer)
        self._rid = rid
        self._deliver = deliver
        self._lost = lost
        self._transport: asyncio.Transport | None = None
        self._ended = False
        self._deadline: asyncio.TimerHandle | None = None
        self.frames = 0
        self.lid = 0
        """The grant's id, which `offload.open` names."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        try:
            frames = [decode_record(p, self._rid) for p in self._reader.feed(data)]
        except LinkError as exc:
            self._end(str(exc), malformed=True)
            return
        for frame in frames:
            if self._ended:  # nothing may follow a done or an error
                self._end_quietly()
                return
            self.frames += 1
            if frame.type in ENDS:
                self._ended = True
            self._deliver(frame)
        if self._ended:
            self._end_quietly()

    def eof_received(self) -> bool:
        self._end("the offload link closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._end(f"the offload link failed: {exc}" if exc else "the offload link closed")

    def _end(self, reason: str, malformed: bool = False) -> None:
        if not self._ended:
            self._ended = True
            self._lost(reason, malformed)
        self._end_quietly()

    def _end_quietly(self) -> None:
        self._ended = True
        if self._transport is not None:
            self._transport.abort()

    def expect_end(self, within_s: float) -> None:
        """The request's last token came: wait at most `within_s` more for its done (and receipt)."""
        if not self._ended and self._transport is not None and self._deadline is None:
            self._deadline = asyncio.get_running_loop().call_later(within_s, self.close)

    def close(self) -> None:
        """Drop the link now (idempotent); no `lost` follows."""
        self._end_quietly()


async def connect(host: str, grant: dict[str, Any], receiver_for: Callable[[Sealer], TokenReceiver],
                  timeout_s: float, record_timeout_s: float) -> TokenReceiver:
    """Make the link with `grant` (handshake on an executor thread: it blocks) and read it on this loop with
    `receiver_for(sealer)`; raises LinkError."""
    from shoal.mesh.split.tensor_link import handshake, shutdown_socket

    loop = asyncio.get_running_loop()
    sock, sealer = await loop.run_in_executor(None, handshake, host, grant, timeout_s, record_timeout_s)
    receiver = receiver_for(sealer)
    try:
        sock.settimeout(None)
        await loop.create_connection(lambda: receiver, sock=sock)
    except OSError as exc:
        shutdown_socket(sock)
        sock.close()
        raise LinkError(f"offload link: {exc}") from None
    return receiver


# --- the serving end --------------------------------------------------------------------------------------

WRITE_HIGH = 256 * 1024
"""Bytes the serving node buffers for a link whose origin does not read, before a send waits for it."""


class TokenSender(asyncio.Protocol):
    """Writes one request's frames on its link from the serving node's loop. `on_lost` is called when the
    link ends before `close()` (the origin went away: the request's task is cancelled)."""

    def __init__(self, sealer: Sealer, rid: int, drain_timeout_s: float) -> None:
        self._sealer = sealer
        self._rid = rid
        self._drain_timeout = drain_timeout_s
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False
        self._gone: str | None = None
        self.on_lost: Callable[[], None] = lambda: None
        self.frames = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        self._fail("the origin wrote on its offload link")

    def eof_received(self) -> bool:
        self._fail("the origin closed its offload link")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        if self._gone is None:
            self._gone = f"offload link lost: {exc}" if exc else "offload link closed"
            if not self._closing:
                self.on_lost()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _fail(self, reason: str) -> None:
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows
        if self._gone is None:
            self._gone = reason

    async def send(self, frame_type: str, body: dict[str, Any]) -> None:
        """Seal and write one frame (a non-blocking write); waits only while the origin does not read.
        Raises LinkError once the link is gone (a `MeshError`, as a data channel's send)."""
        if self._gone is not None or self._transport is None or self._transport.is_closing():
            raise LinkError(self._gone or "the offload link is closed")
        self._transport.write(self._sealer.seal(encode_record(self._rid, frame_type, body)))
        self.frames += 1
        if not self._writable.is_set():
            try:
                await asyncio.wait_for(self._writable.wait(), self._drain_timeout)
            except TimeoutError:
                self._fail("the origin does not read its offload link")
                raise LinkError("the origin does not read its offload link") from None
            if self._gone is not None:
                raise LinkError(self._gone)

    def close(self) -> None:
        """Idempotent: what was written still goes out, then the link closes (no `on_lost`)."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()


async def attach(sock: socket.socket, sealer: Sealer, rid: int, drain_timeout_s: float) -> TokenSender:
    """Run a claimed link (`ServerLink.sock`, `.sealer`) on this loop; raises LinkError."""
    loop = asyncio.get_running_loop()
    sender = TokenSender(sealer, rid, drain_timeout_s)
    try:
        sock.settimeout(None)
        await loop.connect_accepted_socket(lambda: sender, sock=sock)
    except OSError as exc:
        sock.close()
        raise LinkError(f"offload link: {exc}") from None
    return sender
