"""Fixtures for the IPFS tests: the js-ipfs oracle (one daemon per session, offline on loopback), a real
shoal gateway (aiohttp server over a real block store), deterministic file contents."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from shoal.mesh.ipfs.config import IpfsConfig
from shoal.mesh.ipfs.service import IpfsService

from tests.mesh.ipfs.jsipfs import JsIpfs, JsIpfsUnavailable, start_jsipfs


@pytest.fixture(scope="session")
def jsipfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JsIpfs]:
    """A running js-ipfs daemon. Missing or broken js-ipfs fails the test loudly (never a silent skip)."""
    try:
        node = start_jsipfs(tmp_path_factory.mktemp("jsipfs") / "repo")
    except JsIpfsUnavailable as exc:
        pytest.fail(f"IPFS oracle unavailable: {exc}")
    yield node
    node.stop()


def make_data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + size).randbytes(size)


@pytest.fixture
def write_data(tmp_path: Path) -> Callable[[int, int], Path]:
    def write(size: int, seed: int = 0) -> Path:
        path = tmp_path / f"data-{size}-{seed}.bin"
        path.write_bytes(make_data(size, seed))
        return path

    return write


def offline_config(**overrides) -> IpfsConfig:
    """A config that asks no RPC node and no gateway unless told; fast back-off for tests."""
    values = dict(
        rpc_url=None,
        gateways=(),
        block_timeout_s=5.0,
        backoff_base_s=0.01,
        backoff_max_s=0.1,
        retries=2,
        fsync=True,
    )
    values.update(overrides)
    return IpfsConfig(**values)


async def start_gateway(service: IpfsService, middlewares=()) -> tuple[web.AppRunner, str]:
    """Serve `service`'s routes on a free loopback port (a real aiohttp server); return (runner, url)."""
    app = web.Application(middlewares=list(middlewares))
    service.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
