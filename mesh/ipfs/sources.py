"""Where blocks come from. A `BlockSource` is anything with a `name` and `async get_block(cid) -> bytes`;
sources never need to verify (the fetcher does), but must raise `SourceError` (or `BlockNotFoundError`)
rather than return something they know is wrong. Sources that can stream a whole DAG as a CAR also offer
`stream_car(root)` (see `CarSource`).

Shipped here: the local block store, a local IPFS node's RPC API (Kubo or js-ipfs), and trustless HTTP
gateways (any shoal node is one). The mesh (WebRTC) layer adds its own source with the same Protocol.
All HTTP goes through aiohttp, except CAR streams from mesh peers' plain-`http://` gateways
(`GatewaySource(direct_car=True)`), which `http_stream` receives straight into large buffers.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable
from urllib.parse import urlencode, urlsplit

import aiohttp
from multiformats import CID
from shoal.mesh.ipfs import car, cat_stream, http_stream
from shoal.mesh.ipfs.errors import BlockNotFoundError, SourceError
from shoal.mesh.ipfs.store import BlockStore

RAW_CONTENT_TYPE = "application/vnd.ipld.raw"
MAX_BLOCK_RESPONSE = 4 * 1024 * 1024
STREAM_READ_BUFSIZE = 4 * 1024 * 1024
"""Read buffer of a CAR stream: well above one block, or aiohttp pauses and resumes reading every block."""


def describe(exc: BaseException) -> str:
    """A short, readable reason for a network failure."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


@runtime_checkable
class BlockSource(Protocol):
    name: str

    async def get_block(self, cid: CID) -> bytes:
        """The block's bytes (unverified). Raise `BlockNotFoundError` or `SourceError` on failure."""
        ...


@runtime_checkable
class CarSource(Protocol):
    name: str

    def stream_car(self, root: CID) -> AsyncIterator[tuple[CID, car.CarBlock]]:
        """Every block of the DAG under `root` as a CAR stream (unverified); raises SourceError/CodecError.
        A block is bytes-like, or `car.Pieces` (views of the received chunks, not joined: `len()` and
        `bytes()` work)."""
        ...


class LocalStoreSource:
    """The node's own block store."""

    def __init__(self, store: BlockStore, name: str = "local") -> None:
        self.store = store
        self.name = name

    async def get_block(self, cid: CID) -> bytes:
        data = await asyncio.to_thread(self.store.get, cid)
        if data is None:
            raise BlockNotFoundError(f"{cid} is not in the local store")
        return data


async def _read_limited(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise SourceError(f"{what}: response of {response.content_length} bytes is over {limit}")
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise SourceError(f"{what}: response over {limit} bytes")
    return bytes(body)


class _HttpSource:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout_s: float, name: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout_s = timeout_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 5.0))
        self.name = name

    async def _open_stream(self, method: str, url: str, params: dict[str, str], what: str,
                           headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        """A response to read as a stream (no total timeout: each read is bounded instead), HTTP 200 only."""
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.timeout.total, sock_connect=5.0)
        response = await self.session.request(method, url, params=params, headers=headers, timeout=timeout,
                                              read_bufsize=STREAM_READ_BUFSIZE)
        if response.status != 200:
            response.close()
            raise SourceError(f"{self.name}: HTTP {response.status} for {what}")
        return response

    async def _stream_car(self, method: str, url: str, params: dict[str, str], what: str,
                          headers: dict[str, str] | None = None) -> AsyncIterator[tuple[CID, car.CarBlock]]:
        try:
            response = await self._open_stream(method, url, params, what, headers)
            try:
                async for _roots, cid, block in car.read_car_chunks(car.http_body_chunks(response)):
                    yield cid, block
            finally:
                response.close()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceError(f"{self.name}: CAR stream failed: {describe(exc)}") from exc


class KuboRpcSource(_HttpSource):
    """A local IPFS node's RPC API (`/api/v0/block/get`, `cat`, `dag/export`)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout_s: float = 15.0) -> None:
        super().__init__(base_url, session, timeout_s, f"rpc {base_url}")

    async def get_block(self, cid: CID) -> bytes:
        url = f"{self.base_url}/api/v0/block/get"
        try:
            async with self.session.post(url, params={"arg": str(cid)}, timeout=self.timeout) as response:
                if response.status != 200:
                    text = (await response.text())[:200]
                    if response.status == 500 and "not found" in text.lower():
                        raise BlockNotFoundError(f"{self.name}: {cid} not found")
                    raise SourceError(f"{self.name}: HTTP {response.status} for {cid}: {text}")
                return await _read_limited(response, MAX_BLOCK_RESPONSE, self.name)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceError(f"{self.name}: {describe(exc)}") from exc

    async def stream_car(self, root: CID) -> AsyncIterator[tuple[CID, car.CarBlock]]:
        """The DAG's blocks: a raw-leaf file cut from one `cat` (faster than an export on the nodes
        measured, see `cat_stream`), any other DAG exported as a CAR (`dag/export`)."""
        blocks = cat_stream.stream_blocks(root, self.get_block, functools.partial(self._open_cat, root))
        try:
            try:
                first = await anext(blocks, None)
            except cat_stream.NotRawLeaves:
                async for item in self._export(root):
                    yield item
                return
            if first is not None:
                yield first
                async for item in blocks:
                    yield item
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceError(f"{self.name}: {describe(exc)}") from exc
        finally:
            await blocks.aclose()

    async def _open_cat(self, root: CID) -> aiohttp.ClientResponse:
        return await self._open_stream("POST", f"{self.base_url}/api/v0/cat", {"arg": str(root)},
                                       f"cat of {root}")

    def _export(self, root: CID) -> AsyncIterator[tuple[CID, car.CarBlock]]:
        return self._stream_car("POST", f"{self.base_url}/api/v0/dag/export", {"arg": str(root)},
                                f"export of {root}")

    async def import_car(self, body: bytes | AsyncIterator[bytes]) -> None:
        """Push blocks to the node (`dag/import`, pinning the roots)."""
        url = f"{self.base_url}/api/v0/dag/import"
        form = aiohttp.FormData()
        form.add_field("file", body, filename="blocks.car", content_type=car.CONTENT_TYPE)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.timeout.total, sock_connect=5.0)
        try:
            async with self.session.post(url, data=form, params={"pin-roots": "true"}, timeout=timeout) as r:
                if r.status != 200:
                    raise SourceError(f"{self.name}: dag/import HTTP {r.status}: {(await r.text())[:200]}")
                await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceError(f"{self.name}: {describe(exc)}") from exc


class GatewaySource(_HttpSource):
    """A trustless HTTP gateway (`/ipfs/{cid}?format=raw|car`), e.g. another shoal node."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout_s: float = 15.0, *,
                 direct_car: bool = False) -> None:
        super().__init__(base_url, session, timeout_s, f"gateway {base_url}")
        self.direct_car = direct_car and urlsplit(self.base_url).scheme == "http"
        """Receive CAR streams with `http_stream` rather than aiohttp: for gateways known to be shoal nodes
        (mesh peers); a public gateway may redirect, compress or need TLS, which that client refuses."""

    async def get_block(self, cid: CID) -> bytes:
        url = f"{self.base_url}/ipfs/{cid}"
        headers = {"Accept": RAW_CONTENT_TYPE}
        try:
            async with self.session.get(
                url, params={"format": "raw"}, headers=headers, timeout=self.timeout
            ) as response:
                if response.status == 404:
                    raise BlockNotFoundError(f"{self.name}: {cid} not found")
                if response.status != 200:
                    raise SourceError(f"{self.name}: HTTP {response.status} for {cid}")
                return await _read_limited(response, MAX_BLOCK_RESPONSE, self.name)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceError(f"{self.name}: {describe(exc)}") from exc

    def stream_car(self, root: CID) -> AsyncIterator[tuple[CID, car.CarBlock]]:
        url, params = f"{self.base_url}/ipfs/{root}", {"format": "car", "dag-scope": "all"}
        headers = {"Accept": car.CONTENT_TYPE}
        if self.direct_car:
            return self._stream_car_direct(f"{url}?{urlencode(params)}", f"CAR of {root}", headers)
        return self._stream_car("GET", url, params, f"CAR of {root}", headers)

    async def _stream_car_direct(self, url: str, what: str, headers: dict[str, str]
                                 ) -> AsyncIterator[tuple[CID, car.CarBlock]]:
        """As `_stream_car`, received by `http_stream` (no total timeout: each read is bounded instead)."""
        try:
            body = await http_stream.open_body(url, headers, connect_timeout_s=min(self.timeout_s, 5.0),
                                               read_timeout_s=self.timeout_s)
        except SourceError as exc:  # the same kind (unreachable or not), named
            raise type(exc)(f"{self.name}: {exc} for {what}") from exc
        try:
            async for _roots, cid, block in car.read_car_chunks(body.read_chunk):
                yield cid, block
        except SourceError as exc:
            raise SourceError(f"{self.name}: CAR stream failed: {exc}") from exc
        finally:
            body.close()


__all__ = [
    "BlockSource",
    "CarSource",
    "GatewaySource",
    "KuboRpcSource",
    "LocalStoreSource",
]
