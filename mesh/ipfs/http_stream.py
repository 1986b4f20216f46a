"""A small HTTP/1.1 GET whose response body is received straight into large buffers: CAR streams from mesh
peers' plain-`http://` gateways (`GatewaySource(direct_car=True)`).

aiohttp's client receives at most 256 KiB per read (asyncio's selector transport) and its parser copies
every body byte into a new `bytes` object. Here an asyncio `BufferedProtocol` has the kernel copy received
bytes straight into 1 MiB buffers, and their filled parts are handed on as memoryviews — not copied, and
never overwritten (a fresh buffer once one is full), so views a consumer keeps (`car.Pieces`, batches
waiting to be hashed) stay valid. With the body's length known, `SO_RCVLOWAT` wakes the reader once per
512 KiB rather than per packet. On loopback this took a quarter to a third off the client's CPU per CAR
stream (see docs/mesh.md).

Deliberately small and strict: GET only, one request per connection (`Connection: close`), no TLS,
redirects, proxies or content codings; status 200 only; the body framed by `Content-Length` or `chunked`;
the status line and headers at most 64 KiB and received within the read timeout, every later read bounded
by it too; reading pauses while 8 MiB are received but not yet taken. Anything else — a refused, lost or
silent connection, another status, a malformed or oversized header, a body shorter or longer than its
framing says — raises `SourceError` with the reason. Everything else (https, public gateways, RPC) keeps
using aiohttp.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from shoal.mesh.ipfs.errors import GatewayUnreachableError, SourceError

MAX_HEAD = 64 * 1024
"""Status line and headers (and, for chunked bodies, the trailer section), at most."""
MAX_CHUNK_LINE = 4096
"""A chunk-size line with its extensions, at most."""
BUFFER_SIZE = 1 << 20
"""Receive buffers: the kernel copies into these; their filled parts are the chunks handed on."""
MIN_RECEIVE = 64 * 1024
"""A buffer with less room left than this is retired (its views live on) and a fresh one started."""
HIGH_WATER = 8 << 20
"""Received bytes not yet taken by the reader above which receiving pauses (resumed below half)."""
RECEIVE_LOWAT = 512 * 1024
"""With a known body length, the reader is woken only once this much has arrived (`SO_RCVLOWAT`, Linux;
never more than is still to come): fewer wake-ups and larger reads on fast links."""
LOWAT_PATIENCE_S = 0.05
"""A wait for data longer than this drops the low-water mark until data comes: on a slow link it saves
nothing, and the read timeout must mean no data at all, not too little."""

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [\t -~\x80-\xff]*)?")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t -~\x80-\xff]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[\t -~\x80-\xff]*)?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VISIBLE = re.compile(r"[!-~]+(?: [!-~]+)*")
_URL = re.compile(r"[!-~]+")


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: dict[str, str]
    """Header names in lower case; a repeated header's values joined with ", "."""


def build_request(url: str, headers: Mapping[str, str]) -> tuple[str, int, bytes]:
    """(host, port, request bytes) of a GET of `url`; SourceError for a URL or header this client cannot
    send (not plain `http://`, spaces or control characters: URLs come from peers' adverts)."""
    parts = urlsplit(url)
    if not _URL.fullmatch(url) or parts.scheme != "http" or not parts.hostname or "@" in parts.netloc:
        raise SourceError(f"not a plain http:// URL: {url[:200]!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise SourceError(f"bad port in {url[:200]!r}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}"]
    for name, value in {**headers, "Accept-Encoding": "identity", "Connection": "close"}.items():
        if not _TOKEN.fullmatch(name) or not _VISIBLE.fullmatch(value):
            raise SourceError(f"bad request header {name[:80]!r}")
        lines.append(f"{name}: {value}")
    return parts.hostname, port, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_head(raw: bytes) -> ResponseHead:
    """The status line and headers (without the blank line that ends them); SourceError if malformed."""
    lines = raw.split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise SourceError(f"bad HTTP status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise SourceError(f"bad HTTP header line {line[:80]!r}")
        name, value = match.group(1).decode("ascii").lower(), match.group(2).decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return ResponseHead(int(status.group(1)), headers)


def body_length(head: ResponseHead) -> int | None:
    """The body's length from `Content-Length`, or None for a `chunked` body; SourceError for any other
    framing or a content coding."""
    coding = head.headers.get("content-encoding", "identity").strip().lower()
    if coding != "identity":
        raise SourceError(f"unexpected Content-Encoding {coding!r}")
    transfer = head.headers.get("transfer-encoding")
    length = head.headers.get("content-length")
    if transfer is not None:
        if transfer.strip().lower() != "chunked" or length is not None:
            raise SourceError(f"unsupported body framing (Transfer-Encoding {transfer!r}, "
                              f"Content-Length {length!r})")
        return None
    if length is None:
        raise SourceError("response without Content-Length or chunked framing")
    values = {value.strip() for value in length.split(",")}
    if len(values) != 1 or not re.fullmatch(r"\d{1,18}", next(iter(values))):
        raise SourceError(f"bad Content-Length {length!r}")
    return int(values.pop())


class Dechunker:
    """Decodes a `chunked` body fed piece by piece; the chunks' data come out as views of the pieces."""

    def __init__(self) -> None:
        self._state = "size"
        """Expecting a chunk-size line ("size"), chunk data ("data"), the CRLF after them ("crlf"), or
        trailer fields up to a blank line ("trailer")."""
        self._line = b""
        """The current line as received so far."""
        self._left = 0
        """Data bytes still to come in the current chunk."""
        self._trailer = 0
        self.done = False

    def feed(self, piece: memoryview) -> list[memoryview]:
        """The body data in `piece` (views of it); SourceError if the framing is broken."""
        out: list[memoryview] = []
        pos = 0
        while pos < len(piece):
            if self.done:
                raise SourceError("bytes after the end of a chunked body")
            if self._state == "data":
                take = min(self._left, len(piece) - pos)
                out.append(piece[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = "crlf"
            else:
                pos = self._feed_line(piece, pos)
        return out

    def _feed_line(self, piece: memoryview, pos: int) -> int:
        """Take bytes up to and including the next LF into the current line, and act on a whole line; the
        position after what was taken."""
        limit = MAX_HEAD if self._state == "trailer" else MAX_CHUNK_LINE
        window = piece[pos : pos + limit + 2 - len(self._line)]
        end = bytes(window).find(b"\n")
        self._line += bytes(window if end < 0 else window[: end + 1])
        if end < 0:
            if len(self._line) > limit:
                raise SourceError(f"chunked body: a line over {limit} bytes")
            return pos + len(window)
        line, self._line = self._line, b""
        if not line.endswith(b"\r\n"):
            raise SourceError("chunked body: a line not ended by CRLF")
        line = line[:-2]
        if self._state == "crlf":
            if line:
                raise SourceError("chunked body: chunk data longer than its size")
            self._state = "size"
        elif self._state == "size":
            match = _CHUNK_SIZE.fullmatch(line)
            if match is None:
                raise SourceError(f"chunked body: bad chunk size line {line[:40]!r}")
            self._left = int(match.group(1), 16)
            self._state = "data" if self._left else "trailer"
        elif line:  # a trailer field: ignored, but bounded
            self._trailer += len(line) + 2
            if self._trailer > MAX_HEAD:
                raise SourceError(f"chunked body: trailer over {MAX_HEAD} bytes")
        else:  # the blank line after the trailer ends the body
            self.done = True
        return pos + end + 1


class _Receiver(asyncio.BufferedProtocol):
    """Received bytes as views of fresh large buffers, queued for `read`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = memoryview(bytearray())
        self._filled = 0
        self._chunks: deque[memoryview] = deque()
        self._queued = 0
        self._paused = False
        self._eof = False
        self._lost: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._to_come: int | None = None
        """Bytes still to arrive, once the body's length is known (for the low-water mark)."""
        self._lowat = 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def expect(self, nbytes: int) -> None:
        """`nbytes` more (counted from the start of the body still queued here) are to come, then the stream
        ends: from now on a wait lasts until `RECEIVE_LOWAT` of them (or all that are left) are there."""
        self._to_come = nbytes - self._queued

    def _set_lowat(self, nbytes: int) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if nbytes == self._lowat or sock is None or sys.platform != "linux":
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
        except OSError:  # a closed socket: the reader sees why
            return
        self._lowat = nbytes

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buffer) - self._filled < MIN_RECEIVE:
            self._buffer, self._filled = memoryview(bytearray(BUFFER_SIZE)), 0
        return self._buffer[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        start, self._filled = self._filled, self._filled + nbytes
        self._chunks.append(self._buffer[start : self._filled])
        self._queued += nbytes
        if self._to_come is not None:
            self._to_come -= nbytes
        if self._queued >= HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self._eof = True
        self._lost = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, timeout_s: float) -> memoryview | None:
        """The next received piece; None at the end of the connection. SourceError after `timeout_s`
        without data, or when the connection broke."""
        if not self._chunks and not self._eof:
            await self._wait(timeout_s)
        if self._chunks:
            chunk = self._chunks.popleft()
            self._queued -= len(chunk)
            if self._paused and self._queued < HIGH_WATER // 2 and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
            return chunk
        if self._lost is not None:
            raise SourceError(f"connection lost: {self._lost}") from self._lost
        return None

    async def _wait(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._to_come is not None:  # never wait for more than will come
            self._set_lowat(max(1, min(RECEIVE_LOWAT, self._to_come)))
        while not self._chunks and not self._eof:
            patient = self._lowat > 1  # waiting for a low-water mark's worth: for a while only
            self._waiter = loop.create_future()
            try:
                async with asyncio.timeout_at(min(deadline, loop.time() + LOWAT_PATIENCE_S)
                                              if patient else deadline):
                    await self._waiter
            except TimeoutError:
                if not patient or loop.time() >= deadline:
                    raise SourceError(f"no data for {timeout_s:g} s") from None
                self._set_lowat(1)  # wakes the reader at once if anything is there
            finally:
                self._waiter = None


class HttpBody:
    """The body of a 200 response (from `open_body`), read as it arrives. `close()` is safe to call twice."""

    def __init__(self, transport: asyncio.Transport, receiver: _Receiver, length: int | None,
                 rest: memoryview, read_timeout_s: float) -> None:
        self._transport = transport
        self._receiver = receiver
        self.length = length
        """The body's length (`Content-Length`), or None for a chunked body."""
        self._left = length
        """Body bytes not yet received (None for a chunked body: `_dechunker` knows its end)."""
        self._dechunker = Dechunker()
        self._ready: deque[memoryview] = deque()
        self._timeout_s = read_timeout_s
        self.received = 0
        """Body bytes handed out so far."""
        if rest:
            self._take(rest)
        if length is not None:
            receiver.expect(length - len(rest))

    @property
    def done(self) -> bool:
        return self._dechunker.done if self._left is None else self._left == 0

    async def read_chunk(self) -> memoryview | bytes:
        """The next piece of the body (a view of a receive buffer), b"" at its end (`car.ReadChunk`)."""
        while not self._ready:
            if self.done:
                self.close()
                return b""
            piece = await self._receiver.read(self._timeout_s)
            if piece is None:
                expected = "" if self.length is None else f" of {self.length}"
                raise SourceError(f"connection closed after {self.received}{expected} body bytes")
            self._take(piece)
        chunk = self._ready.popleft()
        self.received += len(chunk)
        return chunk

    def _take(self, piece: memoryview) -> None:
        if self._left is None:
            self._ready.extend(part for part in self._dechunker.feed(piece) if part)
        elif len(piece) > self._left:
            raise SourceError(f"body longer than its Content-Length of {self.length}")
        else:
            self._left -= len(piece)
            self._ready.append(piece)

    def close(self) -> None:
        self._transport.close()

    async def __aenter__(self) -> HttpBody:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


async def open_body(url: str, headers: Mapping[str, str], *, connect_timeout_s: float,
                    read_timeout_s: float) -> HttpBody:
    """GET `url` (plain `http://`); the body of its 200 response. Raises SourceError."""
    host, port, request = build_request(url, headers)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout_s):
            transport, receiver = await loop.create_connection(_Receiver, host, port)
    except TimeoutError:
        raise GatewayUnreachableError(f"cannot connect to {host}:{port} (timed out)") from None
    except OSError as exc:
        raise GatewayUnreachableError(f"cannot connect to {host}:{port} ({exc.strerror or exc})") from exc
    try:
        transport.write(request)
        head, rest = await _read_head(receiver, read_timeout_s)
        if head.status != 200:
            raise SourceError(f"HTTP {head.status}")
        return HttpBody(transport, receiver, body_length(head), rest, read_timeout_s)
    except BaseException:
        transport.close()
        raise


async def _read_head(receiver: _Receiver, timeout_s: float) -> tuple[ResponseHead, memoryview]:
    """The response's head, and the body bytes received with it; all within `timeout_s`."""
    data = b""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                piece = await receiver.read(timeout_s)
                if piece is None:
                    raise SourceError("connection closed before the end of the response header")
                before = len(data)
                data += bytes(piece[: MAX_HEAD + 4 - before])  # enough to find the end within the limit
                end = data.find(b"\r\n\r\n", max(0, before - 3))
                if end >= 0:
                    return parse_head(data[:end]), piece[end + 4 - before :]
                if len(data) > MAX_HEAD:
                    raise SourceError(f"response header over {MAX_HEAD} bytes")
    except TimeoutError:
        raise SourceError(f"no complete response header within {timeout_s:g} s") from None
