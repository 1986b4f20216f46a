"""The direct HTTP/1.1 body reader (`mesh.ipfs.http_stream`) that receives CAR streams from mesh peers'
gateways: against a real shoal gateway on loopback (the same verified blocks as through aiohttp), and
against raw socket servers that misbehave — another status, an oversized or endless header, a truncated or
overlong body, framings it does not speak, a silent peer — each a clear `SourceError`, never a hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from shoal.mesh.ipfs import http_stream
from shoal.mesh.ipfs.cid import verify_block
from shoal.mesh.ipfs.errors import CodecError, GatewayUnreachableError, SourceError
from shoal.mesh.ipfs.http_stream import Dechunker, body_length, open_body, parse_head
from shoal.mesh.ipfs.service import IpfsService
from shoal.mesh.ipfs.sources import GatewaySource

from tests.mesh.ipfs.conftest import make_data, offline_config, start_gateway
from tests.mesh.ipfs.faults import FaultyGateway

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on a free loopback port running `handler` per connection; yields its base URL."""
    tasks: set[asyncio.Task] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.readuntil(b"\r\n\r\n")
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def replies(*pieces: bytes | float, hold: bool = False) -> Handler:
    """A handler that sends `pieces` (a float: pause that long), then closes (or with `hold`, stays
    silent)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in pieces:
            if isinstance(piece, float):
                await asyncio.sleep(piece)
            else:
                writer.write(piece)
                await writer.drain()
        if hold:
            await asyncio.sleep(3600)

    return handler


async def read_all(url: str, read_timeout_s: float = 2.0) -> bytes:
    body = await open_body(url, {"Accept": "application/vnd.ipld.car"}, connect_timeout_s=2.0,
                           read_timeout_s=read_timeout_s)
    out = bytearray()
    async with body:
        while chunk := await body.read_chunk():
            out += chunk
    return bytes(out)


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def chunked(body: bytes, size: int) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for start in range(0, len(body), size):
        piece = body[start : start + size]
        out += b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\nX-Trailer: yes\r\n\r\n"


async def test_peer_gateway_car_equals_the_aiohttp_stream_and_verifies(tmp_path: Path, http) -> None:
    source = tmp_path / "model.bin"
    source.write_bytes(make_data(5 * 1024 * 1024 + 7, 1))
    async with IpfsService(offline_config(), tmp_path / "a") as service:
        cid = await service.publish(source)
        runner, url = await start_gateway(service)
        try:
            streams = []
            for direct in (True, False):
                gateway = GatewaySource(url, http, 5.0, direct_car=direct)
                assert gateway.direct_car is direct
                streams.append([(c, bytes(block)) async for c, block in gateway.stream_car(cid)])
        finally:
            await runner.cleanup()
    assert streams[0] == streams[1] and len(streams[0]) == 22  # the root and 21 leaves
    for block_cid, block in streams[0]:
        verify_block(block_cid, block)
    assert not GatewaySource("https://example.org", http, direct_car=True).direct_car  # aiohttp for TLS


@pytest.mark.parametrize("mode", ["truncate", "garbage"])
async def test_a_broken_peer_car_fails_cleanly(tmp_path: Path, http, mode: str) -> None:
    """A CAR cut short or made of noise (with a correct Content-Length) is a CodecError, not a hang."""
    from aiohttp import web

    source = tmp_path / "model.bin"
    source.write_bytes(make_data(600_000, 2))
    async with IpfsService(offline_config(), tmp_path / "a") as service:
        cid = await service.publish(source)
        runner = web.AppRunner(FaultyGateway(service.store, mode).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            gateway = GatewaySource(f"http://127.0.0.1:{port}", http, 2.0, direct_car=True)
            with pytest.raises(CodecError):
                async for _ in gateway.stream_car(cid):
                    pass
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("framing", ["length", "chunked", "chunked-bytewise"])
async def test_bodies_arrive_whole_however_they_are_cut(framing: str) -> None:
    body = make_data(300_000, 3)
    if framing == "length":
        response = ok(body)
        pieces: tuple[bytes | float, ...] = (response[:30], 0.01, response[30:100_000], 0.01,
                                             response[100_000:])
    else:
        response = chunked(body, 70_000)
        step = 1 if framing == "chunked-bytewise" else 65_536
        head = 2000 if step == 1 else 0  # header, chunk lines and the first bytes one by one, then the rest
        pieces = (*(response[i : i + 1] for i in range(head)), response[head:])
    async with raw_server(replies(*pieces)) as url:
        assert await read_all(f"{url}/ipfs/x") == body


@pytest.mark.parametrize(
    "response, reason",
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno", "HTTP 404"),
        (b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n", "HTTP 302"),
        (b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n", "response header over 65536 bytes"),
        (b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n", "bad HTTP status line"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 0\r\n\r\n", "bad HTTP header line"),
        (b"HTTP/1.1 200 OK\r\n Folded: value\r\nContent-Length: 0\r\n\r\n", "bad HTTP header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50, "connection closed after 50 of 100"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"x" * 20, "longer than its Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nxxxxx", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close", "without Content-Length or chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported body framing"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", "unsupported body"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n", "Content-Encoding"),
        (CHUNKED + b"zz\r\n", "bad chunk size"),
        (CHUNKED + b"1" * 5000, "a line over 4096 bytes"),
        (CHUNKED + b"3\r\nabcd\r\n0\r\n\r\n", "longer than its size"),
        (CHUNKED + b"5\r\nab", "connection closed after 2 body"),
        (CHUNKED + b"0\r\n\r\nextra", "after the end of a chunked"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "before the end of the response header"),
    ],
)
async def test_a_misbehaving_server_gives_a_clear_error(response: bytes, reason: str) -> None:
    async with raw_server(replies(response)) as url:
        with pytest.raises(SourceError, match=reason):
            await read_all(f"{url}/ipfs/x")


async def test_a_silent_server_times_out() -> None:
    for pieces in [(), (b"HTTP/1.1 200 OK\r\n",), (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",)]:
        async with raw_server(replies(*pieces, hold=True)) as url:
            start = time.monotonic()
            with pytest.raises(SourceError, match=r"no complete response header within|no data for"):
                await read_all(f"{url}/ipfs/x", read_timeout_s=0.3)
            assert time.monotonic() - start < 2.0


async def test_a_trickling_header_is_bounded_as_a_whole() -> None:
    """One byte every 0.1 s keeps each read alive, but the header must be complete within the timeout."""
    trickle = [p for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100 for p in (0.1, bytes([byte]))]
    async with raw_server(replies(*trickle)) as url:
        start = time.monotonic()
        with pytest.raises(SourceError, match=r"no complete response header within 0\.5 s"):
            await read_all(f"{url}/ipfs/x", read_timeout_s=0.5)
        assert time.monotonic() - start < 2.0


async def test_refused_connections_and_urls_it_cannot_send() -> None:
    async with raw_server(replies()) as url:
        pass  # closed again: nothing listens there now
    # unreachable is its own kind: the mesh source then leaves that peer's gateway alone for a while
    with pytest.raises(GatewayUnreachableError, match=r"cannot connect to 127\.0\.0\.1"):
        await read_all(f"{url}/ipfs/x")
    for bad in ["https://127.0.0.1:1/ipfs/x", "http://127.0.0.1:1/a b", "http://user@127.0.0.1:1/",
                "http://127.0.0.1:99999/", "http://127.0.0.1:1/\r\nX-Injected: 1"]:
        with pytest.raises(SourceError, match=r"http:// URL|bad port") as caught:
            await read_all(bad)
        assert not isinstance(caught.value, GatewayUnreachableError)
    with pytest.raises(SourceError, match="bad request header"):
        await open_body("http://127.0.0.1:1/", {"X-Bad": "a\r\nb"}, connect_timeout_s=1, read_timeout_s=1)


async def test_a_slow_link_drops_the_low_water_mark_instead_of_timing_out() -> None:
    """Less than `RECEIVE_LOWAT` arrives, then nothing for longer than the patience: the reader still gets
    it then (not only once the rest comes, or after the read timeout)."""
    body = make_data(http_stream.RECEIVE_LOWAT + 300_000, 4)
    response = ok(body)
    head = len(response) - len(body)
    cuts = [head + 1000, head + 101_000]
    async with raw_server(replies(response[: cuts[0]], 0.1, response[cuts[0] : cuts[1]], 0.5,
                                  response[cuts[1] :])) as url:
        stream = await open_body(f"{url}/ipfs/x", {}, connect_timeout_s=1.0, read_timeout_s=1.0)
        async with stream:
            got = bytearray(await stream.read_chunk())  # what came with the header
            start = time.monotonic()
            got += await stream.read_chunk()  # 100 kB after 0.1 s, then a pause of 0.5 s
            assert 0.05 < time.monotonic() - start < 0.4
            while chunk := await stream.read_chunk():
                got += chunk
    assert bytes(got) == body


async def test_the_low_water_mark_never_waits_for_bytes_that_will_not_come(monkeypatch) -> None:
    """A body shorter than `RECEIVE_LOWAT`, and the last bytes of a longer one, arrive at once (even with no
    patience limit to fall back on)."""
    monkeypatch.setattr(http_stream, "LOWAT_PATIENCE_S", 10.0)
    for size in (1000, http_stream.RECEIVE_LOWAT + 1000):
        body = make_data(size, 8)
        response = ok(body)
        async with raw_server(replies(response[:-500], 0.2, response[-500:], hold=True)) as url:
            start = time.monotonic()
            stream = await open_body(f"{url}/ipfs/x", {}, connect_timeout_s=1.0, read_timeout_s=5.0)
            async with stream:
                got = bytearray()
                while chunk := await stream.read_chunk():
                    got += chunk
            assert bytes(got) == body and time.monotonic() - start < 1.0


async def test_receiving_pauses_while_the_reader_lags(monkeypatch) -> None:
    monkeypatch.setattr(http_stream, "HIGH_WATER", 256 * 1024)
    body = make_data(4 * 1024 * 1024, 5)
    async with raw_server(replies(ok(body))) as url:
        stream = await open_body(f"{url}/ipfs/x", {}, connect_timeout_s=1.0, read_timeout_s=2.0)
        got = bytearray()
        async with stream:
            while chunk := await stream.read_chunk():
                got += chunk
                await asyncio.sleep(0.002)
                assert stream._receiver._queued < 256 * 1024 + http_stream.BUFFER_SIZE
    assert bytes(got) == body


def test_chunked_decoding_is_the_same_however_it_is_cut() -> None:
    body = make_data(10_000, 6)
    encoded = memoryview(chunked(body, 3000).split(b"\r\n\r\n", 1)[1])
    for step in (1, 7, 4096, len(encoded)):
        decoder = Dechunker()
        out = b"".join(bytes(part) for i in range(0, len(encoded), step)
                       for part in decoder.feed(encoded[i : i + step]))
        assert out == body and decoder.done


def test_response_heads() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-A: 1\r\nx-a: 2")
    assert head.status == 200 and head.headers["x-a"] == "1, 2" and body_length(head) == 7
    assert body_length(parse_head(b"HTTP/1.0 200\r\nTransfer-Encoding: Chunked")) is None
    with pytest.raises(SourceError):
        parse_head(b"HTTP/1.1 200 OK\r\nBad\x00Name: 1")


def test_bytes_received_with_the_header_count_as_arrived() -> None:
    """`expect` is told the body bytes not yet handed out; those already queued will not come again, so the
    low-water mark must not wait for them."""
    receiver = http_stream._Receiver()
    for _ in range(3):
        receiver.get_buffer(-1)[:100] = b"x" * 100
        receiver.buffer_updated(100)
    receiver.expect(1000)
    assert receiver._to_come == 700
