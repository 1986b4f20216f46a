"""CARv1 (content-addressed archive) reading and writing: a dag-cbor header `{roots, version: 1}`, then
sections of `varint(len) | CID | block`. The reader parses CIDv0 sections (a bare 34-byte multihash) too, and
verifies nothing itself: callers check each block against its CID (`cid.verify_block`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from multiformats import CID

from mesh.ipfs.cid import cid_from_bytes
from mesh.ipfs.errors import CodecError
from mesh.ipfs.protobuf import decode_varint, encode_varint

MAX_HEADER = 64 * 1024
MAX_SECTION = 4 * 1024 * 1024
CONTENT_TYPE = "application/vnd.ipld.car"

ReadExactly = Callable[[int], Awaitable[bytes]]


# --- a minimal dag-cbor subset for the header -------------------------------------------------------------

def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * width):
            return bytes([major << 5 | info]) + value.to_bytes(width, "big")
    raise ValueError("CBOR value too large")


def encode_header(roots: list[CID]) -> bytes:
    out = _cbor_head(5, 2) + _cbor_head(3, 5) + b"roots" + _cbor_head(4, len(roots))
    for root in roots:
        raw = b"\x00" + bytes(root)
        out += b"\xd8\x2a" + _cbor_head(2, len(raw)) + raw
    out += _cbor_head(3, 7) + b"version" + _cbor_head(0, 1)
    return encode_varint(len(out)) + out


def _cbor_decode(data: bytes, pos: int, depth: int = 0) -> tuple[Any, int]:
    if depth > 8:
        raise CodecError("CAR header nested too deeply")
    if pos >= len(data):
        raise CodecError("truncated CAR header")
    first = data[pos]
    major, info = first >> 5, first & 31
    pos += 1
    if info < 24:
        value = info
    elif info in (24, 25, 26, 27):
        width = 1 << (info - 24)
        if pos + width > len(data):
            raise CodecError("truncated CAR header")
        value = int.from_bytes(data[pos : pos + width], "big")
        pos += width
    else:
        raise CodecError("unsupported CBOR item in CAR header")
    if major == 0:
        return value, pos
    if major in (2, 3):
        if pos + value > len(data):
            raise CodecError("truncated CAR header")
        raw = data[pos : pos + value]
        return (raw if major == 2 else raw.decode("utf-8", "replace")), pos + value
    if major == 4:
        items = []
        for _ in range(value):
            item, pos = _cbor_decode(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == 5:
        mapping = {}
        for _ in range(value):
            k, pos = _cbor_decode(data, pos, depth + 1)
            v, pos = _cbor_decode(data, pos, depth + 1)
            mapping[k] = v
        return mapping, pos
    if major == 6 and value == 42:
        raw, pos = _cbor_decode(data, pos, depth + 1)
        if not isinstance(raw, bytes) or not raw.startswith(b"\x00"):
            raise CodecError("bad CID link in CAR header")
        try:
            return CID.decode(raw[1:]), pos
        except Exception as exc:  # multiformats raises several exception types
            raise CodecError(f"bad CID in CAR header: {exc}") from None
    raise CodecError(f"unsupported CBOR major type {major} in CAR header")


def decode_header(payload: bytes) -> list[CID]:
    header, end = _cbor_decode(payload, 0)
    if end != len(payload) or not isinstance(header, dict):
        raise CodecError("CAR header is not a single map")
    if header.get("version") != 1:
        raise CodecError(f"unsupported CAR version {header.get('version')!r} (need 1)")
    roots = header.get("roots")
    if not isinstance(roots, list) or not all(isinstance(r, CID) for r in roots):
        raise CodecError("CAR header without a roots list")
    return roots


# --- sections -----------------------------------------------------------------------------------------------

def section_parts(cid: CID, data: bytes) -> tuple[bytes, bytes, bytes]:
    """A section as (length varint, CID, block), for joining many sections without extra copies."""
    raw = bytes(cid)
    return encode_varint(len(raw) + len(data)), raw, data


def encode_section(cid: CID, data: bytes) -> bytes:
    return b"".join(section_parts(cid, data))


def split_section(section: bytes) -> tuple[CID, bytes]:
    """Split a section body into its CID and block bytes (a zero-copy view of `section`)."""
    if len(section) >= 34 and section[0] == 0x12 and section[1] == 0x20:  # CIDv0: a bare sha2-256 multihash
        cid_len = 34
    else:
        pos = 0
        for _ in range(3):  # version, codec, hash function
            _, pos = decode_varint(section, pos)
        digest_len, pos = decode_varint(section, pos)
        cid_len = pos + digest_len
        if cid_len > len(section):
            raise CodecError("CAR section shorter than its CID")
    try:
        cid = cid_from_bytes(section[:cid_len])
    except Exception as exc:  # multiformats raises several exception types
        raise CodecError(f"bad CID in CAR section: {exc}") from None
    return cid, memoryview(section)[cid_len:]  # type: ignore[return-value]  # bytes-like, no 256 KiB copy


async def _read_varint(read_exactly: ReadExactly) -> int | None:
    """A varint from the stream, or None at a clean end of stream."""
    buf = b""
    for _ in range(10):
        try:
            byte = await read_exactly(1)
        except EOFError:
            if not buf:
                return None
            raise CodecError("CAR stream ends inside a varint") from None
        buf += byte
        if not byte[0] & 0x80:
            return decode_varint(buf, 0)[0]
    raise CodecError("CAR varint longer than 10 bytes")


async def read_car(read_exactly: ReadExactly) -> AsyncIterator[tuple[list[CID], CID, bytes]]:
    """Yield (roots, cid, block) for each section of a CAR stream. `read_exactly(n)` must return exactly n
    bytes or raise `EOFError`. A truncated stream raises `CodecError`."""
    length = await _read_varint(read_exactly)
    if length is None or length == 0 or length > MAX_HEADER:
        raise CodecError("CAR stream without a valid header")
    try:
        roots = decode_header(await read_exactly(length))
    except EOFError:
        raise CodecError("CAR stream ends inside its header") from None
    while True:
        length = await _read_varint(read_exactly)
        if length is None:
            return
        if length == 0 or length > MAX_SECTION:
            raise CodecError(f"CAR section length {length} out of range")
        try:
            section = await read_exactly(length)
        except EOFError:
            raise CodecError("CAR stream truncated inside a section") from None
        cid, block = split_section(section)
        yield roots, cid, block


def bytes_reader(data: bytes) -> ReadExactly:
    """A `read_exactly` over an in-memory CAR (for tests and small archives)."""
    view = memoryview(data)
    pos = 0

    async def read_exactly(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            pos = len(view)
            raise EOFError
        chunk = bytes(view[pos : pos + n])
        pos += n
        return chunk

    return read_exactly
