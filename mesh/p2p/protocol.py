"""The mesh wire protocol: typed, versioned frames with a size limit per type. Pure codecs, no I/O.

`control` channel: one orjson object per message, `{"v": 1, "t": TYPE, "b": {...}}` plus an optional
request id `"id"` (the sender awaits a reply) or `"re"` (this frame answers request `re`). A reply has type
`reply` or `error` (`{"code", "message"}`).

`blocks` and `tensors` channels: binary frames, a 16-byte header, then (in the first chunk only) an orjson
metadata object of `meta_len` bytes, then payload bytes::

    magic "SF" | version u8 | kind u8 | flags u8 (bit 0: last chunk) | reserved u8 |
    meta_len u16 | request_id u32 | chunk_index u32          (little-endian)

A payload larger than one data-channel message is split into chunks sent in order on one (ordered, reliable)
channel; `Reassembler` joins them, bounded per kind and in the number of open reassemblies.
Every decode problem raises `ProtocolError`; nothing here raises anything else on peer input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import orjson
from shoal.mesh.p2p.errors import ProtocolError

VERSION = 1
CONTROL = "control"
BLOCKS = "blocks"
TENSORS = "tensors"
CHANNELS = (CONTROL, BLOCKS, TENSORS)
CHANNEL_IDS = {CONTROL: 0, BLOCKS: 1, TENSORS: 2}
"""Each channel's pre-negotiated data-channel id (both ends create them before the offer/answer)."""
BINARY_MESSAGE = 65_536
"""Size of the data-channel messages binary frames are cut into. aiortc reassembles a message by rescanning
its chunk list for every arriving SCTP chunk (quadratic in message size): 64 KiB messages moved blocks
~2.5x faster than 256 KiB ones here, and every remote accepts 64 KiB."""
MAX_MESSAGE_SIZE = 262_144
"""aiortc's maximum data-channel message (65,536 if the remote SDP lacks `a=max-message-size`)."""
MAX_REQUEST_ID = 2**32 - 1

# Control frame types and the largest encoded frame each may be.
CONTROL_LIMITS: dict[str, int] = {
    "ping": 256,
    "pong": 256,
    "bye": 512,
    "reply": 65_536,
    "error": 2_048,
    "advert": 65_536,
    "peers": 65_536,
    "signal": 32_768,
    "link": 512,
    "mesh.key": 1024,
}
"""`link` is sent once by each end when a link opens: `{"max_packet": int, "mtu": int}`, the largest SCTP
packet this end can receive (0: aiortc's standard size only) and its MTU for the link's ICE pair (0: unknown).
See `mesh.aiortc_tuning`. `mesh.key` hands a member the mesh secret (`p2p.rekey`)."""

# Binary frame kinds: kind -> (name, channel, largest total payload after reassembly).
BLOCK_WANT = 1
BLOCK = 2
BLOCK_MISSING = 3
TENSOR = 16
BINARY_KINDS: dict[int, tuple[str, str, int]] = {
    BLOCK_WANT: ("block_want", BLOCKS, 0),
    BLOCK: ("block", BLOCKS, 4 * 1024 * 1024),
    BLOCK_MISSING: ("block_missing", BLOCKS, 0),
    TENSOR: ("tensor", TENSORS, 64 * 1024 * 1024),
}
MAX_META = 4096
FLAG_LAST = 0x01
HEADER = struct.Struct("<2sBBBxHII")
MAGIC = b"SF"


def register_control_type(name: str, max_size: int) -> None:
    """Allow a new control frame type (e.g. for pipeline stages). Re-registering keeps the larger limit."""
    if not name or not name.replace("_", "").replace(".", "").isalnum() or len(name) > 64:
        raise ValueError(f"control type names are short identifiers, got {name!r}")
    if not 64 <= max_size <= MAX_MESSAGE_SIZE:
        raise ValueError(f"control frame limit must be in [64, {MAX_MESSAGE_SIZE}]")
    CONTROL_LIMITS[name] = max(max_size, CONTROL_LIMITS.get(name, 0))


def register_binary_kind(kind: int, name: str, channel: str, max_payload: int) -> None:
    """Allow a new binary frame kind on `blocks` or `tensors` (kinds 32-255 are free for other layers)."""
    if not 32 <= kind <= 255 or channel not in (BLOCKS, TENSORS) or max_payload < 0:
        raise ValueError("binary kinds 32-255 on 'blocks' or 'tensors' with a non-negative limit")
    BINARY_KINDS[kind] = (name, channel, max_payload)


@dataclass(frozen=True)
class ControlFrame:
    type: str
    body: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    re: int | None = None


def _check_id(value: object, what: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_REQUEST_ID:
        raise ProtocolError(f"{what} must be an integer in [0, 2^32)")
    return value


def encode_control(frame: ControlFrame) -> bytes:
    message: dict[str, Any] = {"v": VERSION, "t": frame.type, "b": frame.body}
    if frame.id is not None:
        message["id"] = frame.id
    if frame.re is not None:
        message["re"] = frame.re
    data = orjson.dumps(message)
    limit = CONTROL_LIMITS.get(frame.type)
    if limit is None:
        raise ProtocolError(f"unknown control frame type {frame.type!r}")
    if len(data) > limit:
        raise ProtocolError(f"{frame.type} frame of {len(data)} bytes exceeds its limit of {limit}")
    return data


def decode_control(data: str | bytes) -> ControlFrame:
    """Decode one `control` message; `ProtocolError` for anything malformed, unknown or oversized."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("control frame is neither text nor bytes")
    if len(data) > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"control frame of {len(data)} bytes is too large")
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"control frame is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("control frame is not an object")
    if message.get("v") != VERSION:
        raise ProtocolError(f"unsupported control frame version {message.get('v')!r:.20}")
    kind = message.get("t")
    if not isinstance(kind, str) or kind not in CONTROL_LIMITS:
        raise ProtocolError(f"unknown control frame type {kind!r:.40}")
    if len(data) > CONTROL_LIMITS[kind]:
        raise ProtocolError(f"{kind} frame of {len(data)} bytes exceeds its limit of {CONTROL_LIMITS[kind]}")
    body = message.get("b", {})
    if not isinstance(body, dict):
        raise ProtocolError("control frame body is not an object")
    extra = set(message) - {"v", "t", "b", "id", "re"}
    if extra:
        raise ProtocolError(f"control frame has unknown fields {sorted(extra)[:4]}")
    return ControlFrame(kind, body, _check_id(message.get("id"), "id"), _check_id(message.get("re"), "re"))


@dataclass(frozen=True)
class BinaryFrame:
    kind: int
    request_id: int
    meta: dict[str, Any]
    payload: bytes


@dataclass(frozen=True)
class Chunk:
    kind: int
    request_id: int
    index: int
    last: bool
    meta: dict[str, Any] | None
    payload: bytes


def encode_binary(frame: BinaryFrame, max_message: int = MAX_MESSAGE_SIZE) -> list[bytes]:
    """Split a binary frame into data-channel messages of at most `max_message` bytes."""
    spec = BINARY_KINDS.get(frame.kind)
    if spec is None:
        raise ProtocolError(f"unknown binary frame kind {frame.kind}")
    if len(frame.payload) > spec[2]:
        raise ProtocolError(f"{spec[0]} payload of {len(frame.payload)} bytes exceeds {spec[2]}")
    _check_id(frame.request_id, "request_id")
    meta = orjson.dumps(frame.meta) if frame.meta else b""
    if len(meta) > MAX_META:
        raise ProtocolError(f"frame metadata of {len(meta)} bytes exceeds {MAX_META}")
    if max_message < HEADER.size + len(meta) + 1:
        raise ValueError("max_message is too small for the header and metadata")
    messages: list[bytes] = []
    payload = memoryview(frame.payload)
    offset, index = 0, 0
    while True:
        room = max_message - HEADER.size - (len(meta) if index == 0 else 0)
        piece = payload[offset : offset + room]
        offset += len(piece)
        last = offset >= len(payload)
        header = HEADER.pack(
            MAGIC, VERSION, frame.kind, FLAG_LAST if last else 0,
            len(meta) if index == 0 else 0, frame.request_id, index,
        )
        messages.append(header + (meta if index == 0 else b"") + bytes(piece))
        index += 1
        if last:
            return messages


def decode_chunk(data: bytes, channel: str) -> Chunk:
    """Decode one binary data-channel message received on `channel`."""
    if not isinstance(data, bytes | bytearray):
        raise ProtocolError(f"{channel} frames are binary")
    if len(data) < HEADER.size:
        raise ProtocolError("binary frame shorter than its header")
    if len(data) > MAX_MESSAGE_SIZE:
        raise ProtocolError("binary frame larger than a data-channel message")
    magic, version, kind, flags, meta_len, request_id, index = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("binary frame has a bad magic")
    if version != VERSION:
        raise ProtocolError(f"unsupported binary frame version {version}")
    spec = BINARY_KINDS.get(kind)
    if spec is None or spec[1] != channel:
        raise ProtocolError(f"binary frame kind {kind} is not allowed on {channel}")
    if flags & ~FLAG_LAST:
        raise ProtocolError("binary frame has unknown flags")
    if meta_len > MAX_META or HEADER.size + meta_len > len(data) or (index > 0 and meta_len):
        raise ProtocolError("binary frame metadata length is inconsistent")
    meta: dict[str, Any] | None = None
    if index == 0:
        meta = {}
        if meta_len:
            try:
                meta = orjson.loads(data[HEADER.size : HEADER.size + meta_len])
            except orjson.JSONDecodeError as exc:
                raise ProtocolError(f"binary frame metadata is not JSON: {exc}") from exc
            if not isinstance(meta, dict):
                raise ProtocolError("binary frame metadata is not an object")
    payload = bytes(data[HEADER.size + meta_len :])
    if len(payload) > spec[2]:
        raise ProtocolError(f"{spec[0]} payload exceeds {spec[2]} bytes")
    return Chunk(kind, request_id, index, bool(flags & FLAG_LAST), meta, payload)


class Reassembler:
    """Joins chunks of binary frames received on one channel, bounded in size and number."""

    def __init__(self, channel: str, max_open: int = 64, max_bytes: int = 128 * 1024 * 1024) -> None:
        self.channel = channel
        self.max_open = max_open
        self.max_bytes = max_bytes
        """Bytes all partial frames of this channel may hold together."""
        self.buffered = 0
        self._open: dict[tuple[int, int], tuple[dict[str, Any], list[bytes], int, int]] = {}

    def feed(self, data: bytes) -> BinaryFrame | None:
        """Add one message; returns the whole frame when its last chunk arrived."""
        chunk = decode_chunk(data, self.channel)
        key = (chunk.kind, chunk.request_id)
        limit = BINARY_KINDS[chunk.kind][2]
        if chunk.index == 0:
            if key in self._open:
                raise ProtocolError(f"frame {key} restarted before it finished")
            if chunk.last:
                return BinaryFrame(chunk.kind, chunk.request_id, chunk.meta or {}, chunk.payload)
            if len(self._open) >= self.max_open:
                raise ProtocolError("too many partial frames open at once")
            self._hold(len(chunk.payload))
            self._open[key] = (chunk.meta or {}, [chunk.payload], len(chunk.payload), 1)
            return None
        state = self._open.get(key)
        if state is None or state[3] != chunk.index:
            self._drop(key)
            raise ProtocolError(f"chunk {chunk.index} of frame {key} arrived out of order")
        meta, pieces, size, _ = state
        size += len(chunk.payload)
        if size > limit:
            self._drop(key)
            raise ProtocolError(f"frame {key} grew past its limit of {limit} bytes")
        self._hold(len(chunk.payload))
        pieces.append(chunk.payload)
        if chunk.last:
            del self._open[key]
            self.buffered -= size
            return BinaryFrame(chunk.kind, chunk.request_id, meta, b"".join(pieces))
        self._open[key] = (meta, pieces, size, chunk.index + 1)
        return None

    def _hold(self, size: int) -> None:
        if self.buffered + size > self.max_bytes:
            raise ProtocolError(f"partial frames on {self.channel} would exceed {self.max_bytes} bytes")
        self.buffered += size

    def _drop(self, key: tuple[int, int]) -> None:
        state = self._open.pop(key, None)
        if state is not None:
            self.buffered -= state[2]

    def clear(self) -> None:
        self._open.clear()
        self.buffered = 0
