"""The on-disk block store: verified atomic writes, pins, reachability, garbage collection, accounting."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from shoal.mesh.ipfs.cid import RAW, make_cid
from shoal.mesh.ipfs.errors import VerificationError
from shoal.mesh.ipfs.importer import ImportOptions, import_stream
from shoal.mesh.ipfs.store import BlockStore

from tests.mesh.ipfs.conftest import make_data


def test_put_verifies_and_never_stores_a_wrong_block(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    cid = make_cid(b"good", RAW, 1)
    with pytest.raises(VerificationError):
        store.put(cid, b"evil")
    assert not store.has(cid)
    assert store.get(cid) is None
    assert list((tmp_path / "tmp").iterdir()) == []  # no temp file left behind either
    assert store.put(cid, b"good") is True
    assert store.put(cid, b"good") is False
    assert store.get(cid) == b"good"


def test_cidv0_and_cidv1_share_a_block(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    blocks: list = []
    root = import_stream(io.BytesIO(b"tiny"), blocks.append, ImportOptions(cid_version=0)).root
    store.put(root, blocks[0].data)
    from multiformats import CID

    v1 = CID("base32", 1, "dag-pb", root.digest)
    assert store.get(v1) == blocks[0].data


def test_pins_gc_and_accounting(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    kept: list = []
    dropped: list = []
    options = ImportOptions(cid_version=1, chunk_size=1024, max_links=4)
    keep_root = import_stream(io.BytesIO(make_data(20_000, 1)), kept.append, options).root
    import_stream(io.BytesIO(make_data(9_000, 2)), dropped.append, options)
    for block in kept + dropped:
        store.put(block.cid, block.data)
    total = sum(len(b.data) for b in kept + dropped)
    assert store.stats().blocks == len(kept) + len(dropped)
    assert store.stats().bytes == total
    store.pin(keep_root, name="keep", size=20_000)
    assert store.reachable([keep_root]) == {store.path_of(b.cid).name for b in kept}
    freed = store.gc()
    assert freed.blocks == len(dropped)
    assert freed.bytes == sum(len(b.data) for b in dropped)
    assert all(store.has(b.cid) for b in kept)
    assert not any(store.has(b.cid) for b in dropped)
    assert store.stats().bytes == sum(len(b.data) for b in kept)
    assert store.pins()[str(keep_root)].name == "keep"
    assert store.unpin(keep_root)
    assert store.gc().blocks == len(kept)
    assert store.stats().blocks == 0
