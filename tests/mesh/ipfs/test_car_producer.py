"""Gateway CARs from the model file: leaf runs already in the page cache are read on the event loop, the
rest in a worker thread; either way the bytes are those of the block-by-block CAR, a changed file's
leaves are sent once each (re-hashed), and a part is never overwritten while anything holds a view of it.
Real files, real CIDs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import shoal.mesh.ipfs.car_producer as producer_module
from multiformats import CID
from shoal.mesh.ipfs import car
from shoal.mesh.ipfs.car_producer import CarProducer, iter_car, produce
from shoal.mesh.ipfs.cid import DAG_PB, verify_block
from shoal.mesh.ipfs.reader import decode_file_node
from shoal.mesh.ipfs.service import IpfsService
from shoal.mesh.ipfs.store import BlockStore

from tests.mesh.ipfs.conftest import make_data, offline_config

MIB = 1024 * 1024
pytestmark = pytest.mark.skipif(producer_module._RWF_NOWAIT is None, reason="needs preadv(RWF_NOWAIT)")


def dag_order(store: BlockStore, root: CID) -> list[CID]:
    """Every block of the DAG, depth-first (interior nodes before their children)."""
    out, stack = [], [root]
    while stack:
        cid = stack.pop()
        out.append(cid)
        if cid.codec.name == DAG_PB:
            stack.extend(child for child, _ in reversed(decode_file_node(cid, store.get(cid)).children))
    return out


def block_by_block(store: BlockStore, root: CID) -> bytes:
    out = car.encode_header([root])
    for cid in dag_order(store, root):
        out += car.encode_section(cid, store.get(cid))  # type: ignore[arg-type]
    return out


async def published(tmp_path: Path, size: int) -> tuple[IpfsService, CID]:
    source = tmp_path / "model.bin"
    source.write_bytes(make_data(size, 11))
    service = IpfsService(offline_config(), tmp_path / "node")
    await service.start()
    return service, await service.publish(source)


async def collect(producer: CarProducer) -> bytes:
    return b"".join([bytes(part) async for part in produce(producer)])


async def test_cached_leaf_runs_are_read_inline_and_the_rest_in_a_thread(tmp_path: Path) -> None:
    service, root = await published(tmp_path, 50 * MIB + 5)  # 201 leaves under 2 interior nodes
    try:
        producer = CarProducer(service.store, root, reuse_buffers=True)
        kinds = []
        while not producer.done:
            parts = producer.next_batch(nowait=True)
            kinds.append("inline" if parts is not None else "thread")
            if parts is None:
                parts = producer.next_batch()
            assert parts
        assert kinds.count("thread") == 2  # the root with the first interior node, then the second one
        assert kinds.count("inline") > 45  # ~1 MiB each
        assert await collect(CarProducer(service.store, root, reuse_buffers=True)) == \
            block_by_block(service.store, root) == b"".join(bytes(p) for p in iter_car(service.store, root))
    finally:
        await service.stop()


async def test_data_not_in_the_page_cache_is_read_in_a_thread(tmp_path: Path, monkeypatch) -> None:
    """`preadv(RWF_NOWAIT)` failing (nothing cached) or reading short (partly cached) sends that batch to a
    worker thread, which reads it whole; the file is not taken for changed."""
    service, root = await published(tmp_path, 9 * MIB + 7)
    real_preadv = os.preadv
    calls = {"nowait": 0}

    def preadv(fd: int, views: list, offset: int, flags: int = 0) -> int:
        if not flags:
            return real_preadv(fd, views, offset)
        calls["nowait"] += 1
        if calls["nowait"] % 2:
            raise BlockingIOError(11, "would block")
        return real_preadv(fd, views[:1], offset, flags)  # a short read

    try:
        monkeypatch.setattr(producer_module.os, "preadv", preadv)
        producer = CarProducer(service.store, root, reuse_buffers=True)
        assert await collect(producer) == block_by_block(service.store, root)
        assert calls["nowait"] > 2 and not producer._untrusted
    finally:
        await service.stop()


async def test_a_changed_file_sends_each_leaf_once(tmp_path: Path) -> None:
    """A file whose guard no longer matches (here: touched) is noticed while its first run is read; that
    leaf and the rest go through the store, which re-hashes them, each once."""
    service, root = await published(tmp_path, 3 * MIB + 1)
    try:
        os.utime(service.model_path(root))
        body = await collect(CarProducer(service.store, root, reuse_buffers=True))
        sent = [(cid, block) async for _, cid, block in car.read_car_chunks(car.in_memory(body))]
        assert [cid for cid, _ in sent] == dag_order(service.store, root)
        for cid, block in sent:
            verify_block(cid, block)
    finally:
        await service.stop()


async def test_parts_still_held_are_never_overwritten(tmp_path: Path) -> None:
    """With reused buffers, a part that a consumer (or a transport's unsent rest) still holds keeps its
    bytes; parts let go of are written over again (two buffers in all)."""
    service, root = await published(tmp_path, 12 * MIB + 3)
    try:
        held: list[tuple[memoryview, bytes]] = []
        async for part in produce(CarProducer(service.store, root, reuse_buffers=True)):
            if isinstance(part, memoryview):
                held.append((part, bytes(part)))
        assert all(bytes(view) == copy for view, copy in held)

        buffers = set()
        async for part in produce(CarProducer(service.store, root, reuse_buffers=True)):
            if isinstance(part, memoryview):
                buffers.add(id(part.obj))
        assert len(buffers) <= 6  # two buffers, a few replaced while a thread's result was still held
    finally:
        await service.stop()
