"""The fetcher's policy: source order, per-source timeouts, back-off, bans for bad blocks. The sources here
are small in-process fakes that inject one fault each; the store and fetcher are real."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from multiformats import CID
from shoal.mesh.ipfs.errors import BlockNotFoundError, SourceError
from shoal.mesh.ipfs.fetcher import Fetcher
from shoal.mesh.ipfs.importer import ImportOptions, import_stream
from shoal.mesh.ipfs.service import IpfsService
from shoal.mesh.ipfs.sources import GatewaySource, KuboRpcSource
from shoal.mesh.ipfs.store import BlockStore

from tests.mesh.ipfs.conftest import make_data, offline_config


class DictSource:
    """Serves blocks from a dict; `fault` = "wrong" | "hang" | "error" | None."""

    def __init__(self, name: str, blocks: dict[bytes, bytes], fault: str | None = None) -> None:
        self.name = name
        self.blocks = blocks
        self.fault = fault
        self.calls = 0

    async def get_block(self, cid: CID) -> bytes:
        self.calls += 1
        if self.fault == "hang":
            await asyncio.sleep(3600)
        if self.fault == "error":
            raise SourceError(f"{self.name}: injected failure")
        if self.fault == "crash":
            raise RuntimeError("a source with a bug")
        data = self.blocks.get(bytes(cid.digest))
        if data is None:
            raise BlockNotFoundError(f"{self.name}: no {cid}")
        return b"evil" + data[4:] if self.fault == "wrong" else data


def small_dag() -> tuple[CID, dict[bytes, bytes]]:
    blocks: list = []
    options = ImportOptions(cid_version=1, chunk_size=4096, max_links=8)
    root = import_stream(io.BytesIO(make_data(40_000, 3)), blocks.append, options).root
    return root, {bytes(b.cid.digest): b.data for b in blocks}


async def test_bad_source_is_banned_and_good_one_used(tmp_path: Path) -> None:
    root, blocks = small_dag()
    bad = DictSource("bad", blocks, fault="wrong")
    good = DictSource("good", blocks)
    config = offline_config(ban_after_bad_blocks=2, parallelism=1, backoff_base_s=1e-6)
    fetcher = Fetcher(BlockStore(tmp_path), [bad, good], config)
    await fetcher.fetch_dag(root)
    assert bad.calls == 2  # two bad blocks, then banned: never asked again
    assert fetcher.stats.bad_blocks == 2
    assert fetcher.stats.by_source["good"] == len(blocks)


async def test_hanging_source_times_out_and_backs_off(tmp_path: Path) -> None:
    root, blocks = small_dag()
    slow = DictSource("slow", blocks, fault="hang")
    good = DictSource("good", blocks)
    config = offline_config(block_timeout_s=0.2, backoff_base_s=30.0, backoff_max_s=60.0, parallelism=1)
    fetcher = Fetcher(BlockStore(tmp_path), [slow, good], config)
    async with asyncio.timeout(20):
        await fetcher.fetch_dag(root)
    assert slow.calls == 1  # timed out once, then backed off for the rest of the pull
    assert fetcher.stats.source_failures == 1
    assert fetcher.stats.by_source["good"] == len(blocks)


async def test_a_source_that_crashes_is_treated_as_failed(tmp_path: Path) -> None:
    root, blocks = small_dag()
    buggy = DictSource("buggy", blocks, fault="crash")
    good = DictSource("good", blocks)
    config = offline_config(parallelism=1, backoff_base_s=30.0, backoff_max_s=60.0)
    fetcher = Fetcher(BlockStore(tmp_path), [buggy, good], config)
    await fetcher.fetch_dag(root)
    assert buggy.calls == 1 and fetcher.stats.source_failures == 1
    assert fetcher.stats.by_source["good"] == len(blocks)


async def test_all_sources_failing_is_a_clear_error(tmp_path: Path) -> None:
    root, blocks = small_dag()
    sources = [DictSource("a", blocks, fault="error"), DictSource("b", {})]
    fetcher = Fetcher(BlockStore(tmp_path), sources, offline_config(retries=2))
    with pytest.raises(BlockNotFoundError) as info:
        await fetcher.fetch_dag(root)
    assert "a: injected failure" in str(info.value) and "b: no" in str(info.value)


async def test_source_order_follows_policy(tmp_path: Path) -> None:
    mesh_source = DictSource("mesh peers", {})
    config = offline_config(rpc_url="http://127.0.0.1:5001", gateways=("http://127.0.0.1:9",),
                            source_order=("local", "mesh", "rpc", "gateway"))
    async with IpfsService(config, tmp_path) as service:
        service.add_source(mesh_source, kind="mesh")
        order = service.sources()
    assert order[0] is mesh_source
    assert isinstance(order[1], KuboRpcSource) and isinstance(order[2], GatewaySource)
    with pytest.raises(ValueError, match="unknown ipfs source kinds"):
        offline_config(source_order=("local", "carrier-pigeon"))
