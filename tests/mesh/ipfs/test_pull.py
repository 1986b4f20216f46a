"""Pulling models: from a real IPFS node's RPC API (js-ipfs), from another shoal node's gateway, through
faulty sources, and from nowhere."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from shoal.mesh.events import EventBus
from shoal.mesh.ipfs.cid import parse_cid
from shoal.mesh.ipfs.errors import BlockNotFoundError, InvalidCidError, UnknownModelError
from shoal.mesh.ipfs.service import IpfsService

from tests.mesh.ipfs.conftest import offline_config, start_gateway
from tests.mesh.ipfs.faults import FaultyGateway, FaultyRpc
from tests.mesh.ipfs.jsipfs import JsIpfs, free_port

MIB = 1024 * 1024


def same_bytes(got: Path, want: Path) -> bool:
    """Compare by digest: a failing `bytes == bytes` makes pytest diff megabytes for minutes."""
    return hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(want.read_bytes()).digest()


def assert_store_all_verified(service: IpfsService) -> int:
    """Every stored block's bytes hash to its key: nothing unverified sits under a valid name, whether in a
    block file or recorded in the filestore (read here straight from the file, trusting no record). Returns
    the number of distinct blocks."""
    import base64
    import os

    keys: set[bytes] = set()
    for path in service.store.keys():
        digest = base64.b32decode(path.name.upper() + "=" * (-len(path.name) % 8))
        assert digest[:2] == b"\x12\x20"
        assert hashlib.sha256(path.read_bytes()).digest() == digest[2:], path
        keys.add(digest)
    for digest, file, offset, length in service.store.files.entries():
        with open(file, "rb") as handle:
            data = os.pread(handle.fileno(), length, offset)
        assert len(data) == length and hashlib.sha256(data).digest() == digest[2:], (file, offset)
        keys.add(digest)
    return len(keys)


async def jsipfs_add(rpc_url: str, path: Path, cid_version: int) -> str:
    params = {"cid-version": str(cid_version), "raw-leaves": "true" if cid_version else "false"}
    async with aiohttp.ClientSession() as session:
        with path.open("rb") as body:
            form = aiohttp.FormData()
            form.add_field("file", body, filename=path.name)
            async with session.post(f"{rpc_url}/api/v0/add", params=params, data=form) as response:
                assert response.status == 200
                import json

                return json.loads((await response.text()).strip().splitlines()[-1])["Hash"]


@pytest.mark.parametrize("cid_version", [0, 1])
async def test_pull_from_jsipfs_rpc(jsipfs: JsIpfs, write_data, tmp_path: Path, cid_version: int) -> None:
    source = write_data(5 * MIB + 777, seed=cid_version)
    cid = parse_cid(await jsipfs_add(jsipfs.rpc_url, source, cid_version))
    bus = EventBus()
    sub = bus.subscribe()
    async with IpfsService(offline_config(rpc_url=jsipfs.rpc_url), tmp_path / "node", bus) as service:
        result = await service.pull_detailed(str(cid))
    assert same_bytes(result.path, source)
    assert result.stats.blocks_fetched == 21 + 1  # 21 leaves and the root
    assert assert_store_all_verified(service) == 22
    kinds = [e.kind for e in bus.recent("pull.")]
    assert kinds[-1] == "pull.done" and "pull.progress" in kinds
    sub.close()


async def test_pull_from_another_shoal_gateway(write_data, tmp_path: Path) -> None:
    source = write_data(7 * MIB + 5, seed=3)
    async with IpfsService(offline_config(), tmp_path / "a") as node_a:
        cid = await node_a.publish(source, "test-model")
        runner, url = await start_gateway(node_a)
        try:
            async with IpfsService(offline_config(gateways=(url,)), tmp_path / "b") as node_b:
                result = await node_b.pull_detailed(str(cid))
        finally:
            await runner.cleanup()
    assert same_bytes(result.path, source)
    assert result.stats.blocks_fetched == 30  # 29 leaves + root, streamed as one CAR
    assert result.stats.blocks_local == 0
    assert sum(result.stats.by_source.values()) == 30
    assert assert_store_all_verified(node_b) == 30


async def test_gateway_serves_raw_and_entity_bytes_car(write_data, tmp_path: Path, http) -> None:
    source = write_data(2 * MIB, seed=4)
    async with IpfsService(offline_config(), tmp_path / "a") as node:
        cid = await node.publish(source)
        runner, url = await start_gateway(node)
        try:
            async with http.get(f"{url}/ipfs/{cid}", params={"format": "raw"}) as r:
                assert r.status == 200 and r.content_type == "application/vnd.ipld.raw"
                assert hashlib.sha256(await r.read()).digest() == bytes(cid.raw_digest)
            params = {"format": "car", "dag-scope": "entity", "entity-bytes": f"{300_000}:{300_010}"}
            async with http.get(f"{url}/ipfs/{cid}", params=params) as r:
                assert r.status == 200
                from shoal.mesh.ipfs import car

                body = await r.read()
                sections = [c async for _, c, _ in car.read_car_chunks(car.in_memory(body))]
            assert len(sections) == 2  # the root and the one leaf covering bytes 300000..300010
            async with http.get(f"{url}/ipfs/{cid}", params={"format": "car", "dag-scope": "block"}) as r:
                body = await r.read()
                assert [c async for _, c, _ in car.read_car_chunks(car.in_memory(body))] == [cid]
            async with http.get(f"{url}/ipfs/{cid}", params={"format": "car", "entity-bytes": "9:3"}) as r:
                assert r.status == 400
            async with http.get(f"{url}/ipfs/not-a-cid", params={"format": "raw"}) as r:
                assert r.status == 400
            async with http.get(f"{url}/ipfs/{cid}") as r:
                assert r.status == 406
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("mode", ["wrong", "truncate", "garbage"])
async def test_faulty_source_is_rejected_and_pull_retries_elsewhere(
    write_data, tmp_path: Path, mode: str
) -> None:
    source = write_data(3 * MIB + 99, seed=5)
    async with IpfsService(offline_config(), tmp_path / "a") as node_a:
        cid = await node_a.publish(source)
        faulty = FaultyGateway(node_a.store, mode)
        bad_runner = web.AppRunner(faulty.app())
        await bad_runner.setup()
        bad_port = free_port()
        await web.TCPSite(bad_runner, "127.0.0.1", bad_port).start()
        good_runner, good_url = await start_gateway(node_a)
        try:
            config = offline_config(
                gateways=(f"http://127.0.0.1:{bad_port}", good_url), ban_after_bad_blocks=2
            )
            async with IpfsService(config, tmp_path / "b") as node_b:
                result = await node_b.pull_detailed(str(cid))
        finally:
            await bad_runner.cleanup()
            await good_runner.cleanup()
    assert same_bytes(result.path, source)
    assert faulty.requests["car"] + faulty.requests["raw"] >= 1  # the faulty source was asked first
    assert result.stats.by_source[f"gateway {good_url}"] >= 1  # and the good one filled the gaps
    if mode == "truncate":
        assert result.stats.source_failures >= 1  # the cut CAR stream was noticed
    else:
        assert result.stats.bad_blocks >= 1  # wrong or garbage blocks were hashed and dropped
    assert assert_store_all_verified(node_b) == 14


@pytest.mark.parametrize("mode", FaultyRpc.CAT_MODES)
async def test_rpc_pull_cuts_leaves_from_one_cat_and_rejects_a_bad_cat(
    write_data, tmp_path: Path, mode: str
) -> None:
    """A raw-leaf file comes from the RPC node as one `cat` cut into leaves (no `dag/export`), every leaf
    hashed; a cat with a flipped byte, cut short or too long is rejected and the gaps are filled elsewhere."""
    source = write_data(3 * MIB + 99, seed=15)
    async with IpfsService(offline_config(), tmp_path / "a") as node_a:
        cid = await node_a.publish(source)
        rpc = FaultyRpc(node_a.store, mode)
        rpc_runner = web.AppRunner(rpc.app())
        await rpc_runner.setup()
        rpc_url = f"http://127.0.0.1:{free_port()}"
        await web.TCPSite(rpc_runner, "127.0.0.1", int(rpc_url.rsplit(":", 1)[1])).start()
        good_runner, good_url = await start_gateway(node_a)
        try:
            config = offline_config(rpc_url=rpc_url, gateways=(good_url,), ban_after_bad_blocks=1)
            async with IpfsService(config, tmp_path / "b") as node_b:
                result = await node_b.pull_detailed(str(cid))
        finally:
            await rpc_runner.cleanup()
            await good_runner.cleanup()
    assert same_bytes(result.path, source)
    assert rpc.requests["cat"] == 1 and rpc.requests["dag/export"] == 0
    assert assert_store_all_verified(node_b) == 14
    if mode == "none":
        assert result.stats.by_source[f"rpc {rpc_url}"] == 14  # root + 13 leaves, all from the cat
        assert result.stats.bad_blocks == result.stats.source_failures == 0
    elif mode == "wrong":
        assert result.stats.bad_blocks >= 1
    else:
        assert result.stats.source_failures >= 1


async def test_resume_uses_stored_blocks(write_data, tmp_path: Path) -> None:
    source = write_data(4 * MIB, seed=6)
    async with IpfsService(offline_config(), tmp_path / "a") as node_a:
        cid = await node_a.publish(source)
        runner, url = await start_gateway(node_a)
        try:
            async with IpfsService(offline_config(gateways=(url,)), tmp_path / "b") as node_b:
                first_leaf = (await node_b.fetcher().get_block(cid)) and None
                del first_leaf
                again = await node_b.pull_detailed(f"/ipfs/{cid}")
        finally:
            await runner.cleanup()
    assert again.stats.blocks_local == 1 and again.stats.blocks_fetched == 16
    assert same_bytes(again.path, source)


async def test_unreachable_sources_give_a_clear_error(tmp_path: Path) -> None:
    cid = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
    dead = f"http://127.0.0.1:{free_port()}"
    bus = EventBus()
    config = offline_config(rpc_url=dead, gateways=(dead,), retries=1)
    async with IpfsService(config, tmp_path / "n", bus) as service:
        with pytest.raises(BlockNotFoundError, match="could not get block"):
            await service.pull(cid)
        with pytest.raises(UnknownModelError, match="neither a known model name"):
            await service.pull("no-such-model")
        with pytest.raises(InvalidCidError):
            await service.pull("QmNotAValidCidAtAll0000000000000000000000000000")
    failed = [e for e in bus.recent("pull.failed")]
    assert len(failed) == 3 and all(e.data["error"] for e in failed)
    assert not any(service.store.keys())


async def test_publish_to_ipfs_pushes_blocks_to_the_rpc_node(
    jsipfs: JsIpfs, write_data, tmp_path: Path
) -> None:
    source = write_data(2 * MIB + 5, seed=12)
    async with IpfsService(offline_config(rpc_url=jsipfs.rpc_url), tmp_path / "a") as node:
        cid = await node.publish(source, "pushed", to_ipfs=True)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{jsipfs.rpc_url}/api/v0/cat", params={"arg": str(cid)},
                                timeout=aiohttp.ClientTimeout(total=30)) as response:
            assert response.status == 200
            assert await response.read() == source.read_bytes()
