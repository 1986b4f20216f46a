"""The filestore: raw leaves kept inside assembled model files (no second copy in block files). Real blocks,
real CIDs, real gateways on loopback. A file that changed under its record is never served wrong bytes: the
changed leaves are refused and fetched again; journals of interrupted pulls are re-hashed when read."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from aiohttp import web
from multiformats import CID
from shoal.mesh.ipfs import car
from shoal.mesh.ipfs.cid import DAG_PB, RAW, make_cid
from shoal.mesh.ipfs.filestore import FileStore
from shoal.mesh.ipfs.reader import decode_file_node
from shoal.mesh.ipfs.service import IpfsService
from shoal.mesh.ipfs.store import BlockStore

from tests.mesh.ipfs.conftest import make_data, offline_config, start_gateway
from tests.mesh.ipfs.test_pull import assert_store_all_verified, same_bytes

MIB = 1024 * 1024


def leaves_of(store: BlockStore, root: CID) -> list[tuple[CID, int, int]]:
    """(leaf CID, offset, length) in file order, from the stored dag-pb nodes."""
    out: list[tuple[CID, int, int]] = []

    def walk(cid: CID, base: int) -> None:
        node = decode_file_node(cid, store.get(cid))  # type: ignore[arg-type]
        pos = base + len(node.data)
        for child, size in node.children:
            if child.codec.name == DAG_PB:
                walk(child, pos)
            else:
                out.append((child, pos, size))
            pos += size

    walk(root, 0)
    return out


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def block_files(store: BlockStore) -> list[Path]:
    return list(store.keys())


def temp_files(service: IpfsService) -> list[Path]:
    return [p for p in service.models_dir.glob(".*")] if service.models_dir.exists() else []


async def pulled_pair(tmp_path: Path, size: int, seed: int):
    """Node A publishes `size` random bytes and serves them; node B pulls them. Returns (a, b, cid, source,
    runner) with both services running; the caller stops them."""
    source = tmp_path / f"src-{seed}.bin"
    source.write_bytes(make_data(size, seed))
    a = IpfsService(offline_config(), tmp_path / "a")
    await a.start()
    cid = await a.publish(source, "fs-test")
    runner, url = await start_gateway(a)
    b = IpfsService(offline_config(gateways=(url,)), tmp_path / "b")
    await b.start()
    await b.pull(str(cid))
    return a, b, cid, source, runner


async def stop_all(*things) -> None:
    for thing in things:
        if isinstance(thing, web.AppRunner):
            await thing.cleanup()
        else:
            await thing.stop()


async def test_pull_and_publish_keep_raw_leaves_only_in_the_model_file(tmp_path: Path) -> None:
    a, b, cid, source, runner = await pulled_pair(tmp_path, 3 * MIB + 17, seed=1)
    try:
        leaves = leaves_of(b.store, cid)
        assert len(leaves) == 13
        for node in (a, b):
            assert same_bytes(node.model_path(cid), source)
            assert [p.name for p in block_files(node.store)] == [node.store.path_of(cid).name]  # root only
            assert node.store.stats().blocks == 14
            assert node.store.stats().bytes == len(node.store.get(cid)) + source.stat().st_size  # type: ignore
            assert assert_store_all_verified(node) == 14
            assert temp_files(node) == []  # no partial file, no journal left behind
            assert not list((node.data_dir / "ipfs" / "filestore").glob("*.journal"))
        for leaf, offset, length in leaves:
            assert b.store.get(leaf) == source.read_bytes()[offset : offset + length]
    finally:
        await stop_all(runner, a, b)


async def test_changed_file_is_never_served_and_its_leaf_is_fetched_again(tmp_path: Path, http) -> None:
    a, b, cid, source, runner = await pulled_pair(tmp_path, 2 * MIB + 5, seed=2)
    b_runner = None
    try:
        model = b.model_path(cid)
        leaves = leaves_of(b.store, cid)
        bad, offset, _ = leaves[3]
        before = os.stat(model)
        flip_byte(model, offset + 100)  # in place; then put size and mtime back
        os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert os.stat(model).st_size == before.st_size

        assert b.store.get(bad) is None  # refused, not served
        assert not b.store.has(bad)
        good = leaves[4][0]
        assert b.store.get(good) == source.read_bytes()[leaves[4][1] : leaves[4][1] + leaves[4][2]]

        b_runner, b_url = await start_gateway(b)
        async with http.get(f"{b_url}/ipfs/{bad}", params={"format": "raw"}) as response:
            assert response.status == 404
        async with http.get(f"{b_url}/ipfs/{cid}", params={"format": "car"}) as response:
            body = await response.content.read()
        sent = []
        async for _, block_cid, block in car.read_car_chunks(car.in_memory(body)):
            sent.append(block_cid)
            assert hashlib.sha256(block).digest() == bytes(block_cid.digest)[2:]  # what is sent is right
        in_order = [cid, *(leaf for leaf, _, _ in leaves[:3])]
        assert 1 <= len(sent) <= len(in_order) and sent == in_order[: len(sent)]  # stops before the bad leaf

        again = await b.pull_detailed(str(cid))
        assert again.stats.blocks_fetched == 1  # only the changed leaf
        assert same_bytes(model, source)
        assert assert_store_all_verified(b) == 1 + len(leaves)
        assert [p.name for p in block_files(b.store)] == [b.store.path_of(cid).name]
    finally:
        await stop_all(*(r for r in (b_runner, runner) if r is not None), a, b)


async def test_touched_file_is_rehashed_once_and_still_serves(tmp_path: Path) -> None:
    a, b, cid, source, runner = await pulled_pair(tmp_path, MIB + 3, seed=3)
    try:
        model = b.model_path(cid)
        os.utime(model)  # new mtime, same bytes
        leaf, offset, length = leaves_of(b.store, cid)[1]
        assert b.store.has(leaf)
        assert b.store.get(leaf) == source.read_bytes()[offset : offset + length]
        assert b.store.files.holds(model, str(cid))  # re-validated: a fresh guard
        again = await b.pull_detailed(str(cid))
        assert again.stats.blocks_fetched == 0
    finally:
        await stop_all(runner, a, b)


async def test_deleted_file_drops_its_leaves_and_a_pull_restores_them(tmp_path: Path) -> None:
    a, b, cid, source, runner = await pulled_pair(tmp_path, 2 * MIB, seed=4)
    try:
        b.model_path(cid).unlink()
        leaves = leaves_of(b.store, cid)
        assert not any(b.store.has(leaf) for leaf, _, _ in leaves)
        assert b.store.stats().blocks == 1  # the root; nothing claimed for the missing file
        again = await b.pull_detailed(str(cid))
        assert again.stats.blocks_fetched == len(leaves)
        assert same_bytes(b.model_path(cid), source)
        assert [p.name for p in block_files(b.store)] == [b.store.path_of(cid).name]  # leaves moved in
        assert assert_store_all_verified(b) == 1 + len(leaves)
    finally:
        await stop_all(runner, a, b)


async def test_gc_keeps_a_pinned_model_file_and_frees_an_unpinned_one(tmp_path: Path) -> None:
    a, b, cid, source, runner = await pulled_pair(tmp_path, 2 * MIB + 9, seed=5)
    try:
        model = b.model_path(cid)
        assert (await b.gc()).blocks == 0
        assert same_bytes(model, source)
        assert await b.unpin(str(cid))
        freed = await b.gc()
        assert freed.blocks == 1 + 9  # root and 9 leaves
        assert freed.bytes == source.stat().st_size + len(a.store.get(cid))  # type: ignore[arg-type]
        assert not model.exists()
        assert b.store.stats().blocks == 0 and b.store.stats().bytes == 0
        assert not list((b.data_dir / "ipfs" / "filestore").iterdir())
    finally:
        await stop_all(runner, a, b)


async def test_gc_also_removes_an_unpinned_model_of_dag_pb_leaves(tmp_path: Path) -> None:
    """CIDv0 leaves are dag-pb (block files); the model file is still the store output, kept while pinned."""
    source = tmp_path / "src.bin"
    source.write_bytes(make_data(MIB + 1, 8))
    async with IpfsService(offline_config(), tmp_path / "a") as a:
        cid = await a.publish(source, cid_version=0)
        runner, url = await start_gateway(a)
        try:
            async with IpfsService(offline_config(gateways=(url,)), tmp_path / "b") as b:
                path = await b.pull(str(cid))
                assert same_bytes(path, source) and len(block_files(b.store)) == 6  # root and 5 leaves
                assert (await b.gc()).blocks == 0 and path.exists()
                assert await b.unpin(str(cid))
                assert (await b.gc()).blocks == 6
                assert not path.exists() and not list((b.data_dir / "ipfs" / "filestore").iterdir())
        finally:
            await runner.cleanup()


async def test_interrupted_car_pull_resumes_from_its_journal(tmp_path: Path) -> None:
    """A pull cancelled mid-CAR keeps the leaves it wrote (journaled, in its temp file); the next pull fetches
    only the rest, re-hashing the journaled ones, and leaves no partial file behind."""
    source = tmp_path / "src.bin"
    source.write_bytes(make_data(6 * MIB + 1, 6))
    async with IpfsService(offline_config(), tmp_path / "a") as a:
        cid = await a.publish(source)

        async def slow_car(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": car.CONTENT_TYPE})
            await response.prepare(request)
            async for part in a.car_stream(cid):
                for pos in range(0, len(part), 64 * 1024):
                    await response.write(bytes(part[pos : pos + 64 * 1024]))
                    await asyncio.sleep(0.01)
            return response

        app = web.Application()
        app.router.add_get("/ipfs/{cid}", slow_car)
        slow_runner = web.AppRunner(app)
        await slow_runner.setup()
        site = web.TCPSite(slow_runner, "127.0.0.1", 0)
        await site.start()
        slow_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        good_runner, good_url = await start_gateway(a)
        try:
            async with IpfsService(offline_config(gateways=(slow_url,)), tmp_path / "b") as b:
                pull = asyncio.ensure_future(b.pull(str(cid)))
                while not any(p.stat().st_size >= 2 * MIB for p in temp_files(b)):
                    assert not pull.done()
                    await asyncio.sleep(0.01)
                pull.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await pull
                journals = list((b.data_dir / "ipfs" / "filestore").glob("*.journal"))
                assert len(journals) == 1 and len(temp_files(b)) == 1
                kept = sum(1 for _ in b.store.files.entries())
                assert 4 <= kept < 24
            async with IpfsService(offline_config(gateways=(good_url,)), tmp_path / "b") as b2:
                result = await b2.pull_detailed(str(cid))
                assert result.stats.blocks_local == 1 + kept  # the root and every journaled leaf
                assert result.stats.blocks_fetched == 25 - kept
                assert same_bytes(result.path, source)
                assert temp_files(b2) == []
                assert not list((b2.data_dir / "ipfs" / "filestore").glob("*.journal"))
                assert assert_store_all_verified(b2) == 26
        finally:
            await slow_runner.cleanup()
            await good_runner.cleanup()


def test_journal_leaves_are_hashed_on_read(tmp_path: Path) -> None:
    """A journal (a file still being written, e.g. by a pull that was `kill -9`ed) is never trusted: a leaf
    whose bytes changed is refused; the others are served."""
    store = BlockStore(tmp_path / "ipfs")
    data = [make_data(1000, i) for i in range(3)]
    cids = [make_cid(d, RAW, 1) for d in data]
    partial = tmp_path / "models" / ".x.gguf.tmp"
    partial.parent.mkdir()
    partial.write_bytes(b"".join(data))
    journal = store.files.open_journal(partial, "bafyroot")
    journal.append([(bytes(c.digest), i * 1000, 1000) for i, c in enumerate(cids)])
    journal.close()  # the writer dies: no record of a complete file
    flip_byte(partial, 1500)

    fresh = BlockStore(tmp_path / "ipfs")  # another process reading the same store
    assert fresh.get(cids[0]) == data[0] and fresh.get(cids[2]) == data[2]
    assert fresh.get(cids[1]) is None


def test_partials_of_a_live_writer_are_not_dropped(tmp_path: Path) -> None:
    files = FileStore(tmp_path / "fs", tmp_path)
    partial = tmp_path / ".m.gguf.part"
    partial.write_bytes(b"x" * 10)
    journal = files.open_journal(partial, "bafyroot")
    other = FileStore(tmp_path / "fs", tmp_path)  # e.g. `shoal pull` beside a running node
    assert other.drop_partials("bafyroot") == 0 and partial.exists()
    journal.close()
    assert other.drop_partials("bafyroot") == 1 and not partial.exists()


async def test_car_from_the_model_file_equals_the_block_by_block_car(tmp_path: Path, monkeypatch) -> None:
    """The gateway's CAR (leaf runs read straight from the model file into reused buffers, which grow while
    views of earlier batches are still held) is byte for byte the CAR built block by block."""
    import shoal.mesh.ipfs.car_producer as producer_module
    from shoal.mesh.ipfs.car_producer import CarProducer, produce

    source = tmp_path / "src.bin"
    source.write_bytes(make_data(9 * MIB + 7, 7))
    async with IpfsService(offline_config(), tmp_path / "a") as a:
        cid = await a.publish(source)
        expected = car.encode_header([cid])
        for leaf_or_node in [cid, *(leaf for leaf, _, _ in leaves_of(a.store, cid))]:
            expected += car.encode_section(leaf_or_node, a.store.get(leaf_or_node))  # type: ignore[arg-type]

        producer = CarProducer(a.store, cid, reuse_buffers=True)
        assert await asyncio.to_thread(producer.total_size) == len(expected)
        got = bytearray()
        held = []
        sizes = iter([512 << 10, 1 << 20, 3 << 20, 6 << 20] + [8 << 20] * 10)
        async for part in produce(producer):
            got += part
            held.append(part)  # views of earlier batches stay alive
            monkeypatch.setattr(producer_module, "BATCH_BYTES", next(sizes))  # growing batches
        assert bytes(got) == expected
        assert b"".join(car_producer_parts(a.store, cid)) == expected  # the plain (non-reusing) path


def car_producer_parts(store: BlockStore, root: CID) -> list[bytes]:
    from shoal.mesh.ipfs.car_producer import iter_car

    return [bytes(part) for part in iter_car(store, root)]
