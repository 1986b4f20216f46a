"""CARv1 (content-addressed archive) reading and writing: a dag-cbor header `{roots, version: 1}`, then
sections of `varint(len) | CID | block`. The reader parses CIDv0 sections (a bare 34-byte multihash) too, and
verifies nothing itself: callers check each block against its CID (`cid.verify_block`).

`read_car_chunks` (for network streams) hands blocks over without copying them: a view of the received
chunk, or `Pieces` (views of several chunks) for a block that arrived split — hash and write those piece by
piece (`cid.verify_pieces`, `os.pwritev`); `bytes(block)` joins one when contiguous bytes are needed."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from multiformats import CID
from shoal.mesh.ipfs.cid import cid_from_bytes, cid_to_bytes
from shoal.mesh.ipfs.errors import CodecError
from shoal.mesh.ipfs.protobuf import decode_varint, encode_varint

MAX_HEADER = 64 * 1024
MAX_SECTION = 4 * 1024 * 1024
CONTENT_TYPE = "application/vnd.ipld.car"

class Pieces:
    """A block that arrived in several chunks, as views of them (not joined)."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts
        self.size = sum(len(part) for part in parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


CarBlock = bytes | memoryview | Pieces
"""A block as a CAR stream hands it over."""


def block_parts(block: CarBlock) -> list[bytes | memoryview]:
    return list(block.parts) if isinstance(block, Pieces) else [block]


def contiguous(block: CarBlock) -> bytes | memoryview:
    """The block as one buffer (joins `Pieces`; for dag-pb decoding, block files)."""
    return bytes(block) if isinstance(block, Pieces) else block


ReadChunk = Callable[[], Awaitable[bytes]]
"""The next received chunk of a stream, of any size; b"" at its end."""


def http_body_chunks(response: Any) -> ReadChunk:
    """`ReadChunk` over an aiohttp response's body: each piece as received, b"" at its end."""

    async def read_chunk() -> bytes:
        while True:
            data, end_of_http_chunk = await response.content.readchunk()
            if data or not end_of_http_chunk:  # (b"", True) only marks an HTTP chunk boundary
                return data

    return read_chunk


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
        raw = b"\x00" + cid_to_bytes(root)
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
    raw = cid_to_bytes(cid)
    return encode_varint(len(raw) + len(data)), raw, data


def encode_section(cid: CID, data: bytes) -> bytes:
    return b"".join(section_parts(cid, data))


def _cid_length(head: bytes | memoryview, available: int) -> int:
    """Length of the CID at the start of a section (`head`: its first bytes)."""
    if len(head) >= 34 and head[0] == 0x12 and head[1] == 0x20:  # CIDv0: a bare sha2-256 multihash
        return 34
    pos = 0
    try:
        for _ in range(3):  # version, codec, hash function
            _, pos = decode_varint(head, pos)
        digest_len, pos = decode_varint(head, pos)
    except CodecError:
        raise CodecError("bad CID in CAR section") from None
    if pos + digest_len > available:
        raise CodecError("CAR section shorter than its CID")
    return pos + digest_len


def _section_cid(raw: bytes | memoryview) -> CID:
    try:
        return cid_from_bytes(raw)
    except Exception as exc:  # multiformats raises several exception types
        raise CodecError(f"bad CID in CAR section: {exc}") from None


class ChunkBuffer:
    """Received chunks not yet parsed. Bytes are taken from the front without copying: a view of one chunk,
    or `Pieces` (views of several)."""

    def __init__(self, read_chunk: ReadChunk) -> None:
        self._read = read_chunk
        self._chunks: deque[memoryview] = deque()
        self.available = 0
        self._eof = False

    async def fill(self, n: int) -> bool:
        """Receive until `n` bytes are buffered; False if the stream ends first."""
        while self.available < n:
            if self._eof:
                return False
            chunk = await self._read()
            if not chunk:
                self._eof = True
                continue
            self._chunks.append(memoryview(chunk))
            self.available += len(chunk)
        return True

    def take(self, n: int) -> memoryview | Pieces:
        """The next `n` bytes (buffered already): a view, or views of several chunks."""
        if n == 0:
            return memoryview(b"")
        first = self._chunks[0]
        if len(first) >= n:
            self._drop(n)
            return first[:n]
        parts: list[memoryview] = []
        left = n
        while left:
            part = self._chunks[0][:left]
            parts.append(part)
            left -= len(part)
            self._drop(len(part))
        return Pieces(parts)

    def peek(self, n: int) -> bytes:
        """Up to `n` bytes from the front, not consumed (for small headers)."""
        out = b""
        for chunk in self._chunks:
            out += bytes(chunk[: n - len(out)])
            if len(out) >= n:
                break
        return out

    def _drop(self, n: int) -> None:
        self.available -= n
        while n:
            first = self._chunks[0]
            if len(first) > n:
                self._chunks[0] = first[n:]
                return
            n -= len(first)
            self._chunks.popleft()


async def _chunk_varint(chunks: ChunkBuffer) -> int | None:
    """A varint from the stream, or None at a clean end of stream."""
    if not await chunks.fill(1):
        return None
    await chunks.fill(10)  # a shorter stream is fine: the varint may be complete
    head = chunks.peek(10)
    try:
        value, end = decode_varint(head, 0)
    except CodecError:
        if len(head) < 10:
            raise CodecError("CAR stream ends inside a varint") from None
        raise
    chunks.take(end)
    return value


async def read_car_chunks(read_chunk: ReadChunk) -> AsyncIterator[tuple[list[CID], CID, CarBlock]]:
    """Yield (roots, cid, block) for each section of a CAR stream read as chunks of any size (one await per
    received chunk, not per field); blocks are not copied: views of the received chunks (see `Pieces`). A
    truncated or malformed stream raises `CodecError`. The caller verifies each block against its CID."""
    chunks = ChunkBuffer(read_chunk)
    length = await _chunk_varint(chunks)
    if length is None or length == 0 or length > MAX_HEADER:
        raise CodecError("CAR stream without a valid header")
    if not await chunks.fill(length):
        raise CodecError("CAR stream ends inside its header")
    roots = decode_header(bytes(contiguous(chunks.take(length))))
    while True:
        length = await _chunk_varint(chunks)
        if length is None:
            return
        if length == 0 or length > MAX_SECTION:
            raise CodecError(f"CAR section length {length} out of range")
        if not await chunks.fill(length):
            raise CodecError("CAR stream truncated inside a section")
        cid_len = _cid_length(chunks.peek(min(length, 64)), length)
        cid = _section_cid(chunks.peek(cid_len))
        chunks.take(cid_len)
        yield roots, cid, chunks.take(length - cid_len)


def in_memory(data: bytes) -> ReadChunk:
    """A `read_chunk` over an in-memory CAR (for tests and small archives): all of it, then the end."""
    parts = [bytes(data), b""]

    async def read_chunk() -> bytes:
        return parts.pop(0) if len(parts) > 1 else b""

    return read_chunk
