"""Partial pull: a node that runs layers [10, 20) of the default model fetches only the blocks covering the
GGUF header and those layers' tensors, and the sparse file it writes runs those layers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from multiformats import CID
from shoal.mesh.ipfs.catalog import EMBEDDED_CID, EMBEDDED_NAME
from shoal.mesh.ipfs.cid import block_key
from shoal.mesh.ipfs.fetcher import FetchStats
from shoal.mesh.ipfs.reader import decode_file_node
from shoal.mesh.ipfs.service import IpfsService
from shoal.mesh.ipfs.store import BlockStore
from shoal.models.embedded import embedded_model_path
from shoal.models.gguf import READ_CHUNK, GGUFModel
from shoal.models.span import LayerSpan

from tests.mesh.ipfs.conftest import offline_config, start_gateway

SPAN = LayerSpan(10, 20)


@dataclass
class PartialPull:
    root: CID
    publisher: BlockStore
    puller: BlockStore
    sparse_path: Path
    stats: FetchStats


def covering_blocks(store: BlockStore, root: CID, ranges: list[tuple[int, int]]) -> set[str]:
    """Keys of the blocks a reader must touch to read `ranges` of the file: every node on the way down."""
    keys: set[str] = set()

    def walk(cid: CID, base: int) -> None:
        keys.add(block_key(cid))
        node = decode_file_node(cid, store.get(cid))  # type: ignore[arg-type]
        pos = base + len(node.data)
        for child, size in node.children:
            if any(start < pos + size and pos < end for start, end in ranges):
                walk(child, pos)
            pos += size

    walk(root, 0)
    return keys


async def _partial_pull(tmp: Path) -> PartialPull:
    async with IpfsService(offline_config(), tmp / "a") as node_a:
        root = await node_a.ensure_embedded()
        assert await node_a.ensure_embedded() == root  # second start: already there
        runner, url = await start_gateway(node_a)
        try:
            async with IpfsService(offline_config(gateways=(url,)), tmp / "b") as node_b:
                sparse_path = await node_b.pull_span(EMBEDDED_NAME, SPAN)
                stats = node_b.last_span_stats
        finally:
            await runner.cleanup()
    assert stats is not None
    return PartialPull(root, node_a.store, node_b.store, sparse_path, stats)


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> PartialPull:
    return asyncio.run(_partial_pull(tmp_path_factory.mktemp("partial")))


@pytest.fixture(scope="module")
def full_model() -> GGUFModel:
    return GGUFModel.open(embedded_model_path())


def test_partial_pull_fetches_only_header_and_span_blocks(
    partial: PartialPull, full_model: GGUFModel
) -> None:
    assert str(partial.root) == EMBEDDED_CID  # the catalog's built-in CID is what the importer computes
    index = full_model.index
    tensor_ranges = index.byte_ranges_for_span(SPAN)
    least = covering_blocks(partial.publisher, partial.root, [(0, index.data_start), *tensor_ranges])
    most = covering_blocks(partial.publisher, partial.root,
                           [(0, index.data_start + READ_CHUNK), *tensor_ranges])  # header read-ahead
    fetched = {path.name for path in partial.puller.keys()}
    all_blocks = partial.publisher.block_keys()
    assert least <= fetched <= most, (len(least), len(fetched), len(most))
    assert partial.stats.blocks_fetched == len(fetched)
    assert len(fetched) < len(all_blocks) // 2  # 10 of 30 layers: far fewer blocks than the file's 380
    print(f"partial pull of layers {SPAN}: {len(fetched)} of {len(all_blocks)} blocks")

    sparse = GGUFModel.open(partial.sparse_path)
    assert partial.sparse_path.stat().st_size == embedded_model_path().stat().st_size
    assert sparse.index.tensors == index.tensors
    for name in sparse.tensor_names_for_span(SPAN):
        assert np.array_equal(sparse.raw(name), full_model.raw(name)), name
    outside = "blk.25.ffn_down.weight"
    assert not np.array_equal(sparse.raw(outside), full_model.raw(outside))  # really not fetched


def _hidden(full_model: GGUFModel) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, full_model.config.hidden_size)).astype(np.float32)


def _run(stage, hidden: np.ndarray) -> np.ndarray:
    try:
        stage.add_sequence(0)
        return stage.prefill(0, hidden)
    finally:
        stage.close()


def test_span_runs_from_the_sparse_file(partial: PartialPull, full_model: GGUFModel) -> None:
    """The NumPy reference for layers [10, 20) gives identical output from the sparse and the full file."""
    from shoal.models.reference import ReferenceStage

    sparse = GGUFModel.open(partial.sparse_path)
    hidden = _hidden(full_model)
    got = _run(ReferenceStage(sparse, SPAN, max_context=16), hidden)
    want = _run(ReferenceStage(full_model, SPAN, max_context=16), hidden)
    assert np.array_equal(got, want)


def test_compiled_shard_runs_from_the_sparse_file(partial: PartialPull, full_model: GGUFModel) -> None:
    """The TVM-compiled stage for layers [10, 20) loads from the sparse file and matches the reference."""
    from shoal.models.reference import ReferenceStage
    from shoal.models.runtime import CompiledStage

    sparse = GGUFModel.open(partial.sparse_path)
    hidden = _hidden(full_model)
    got = _run(CompiledStage.load(sparse, SPAN, target="llvm", quantization="f32"), hidden)
    want = _run(ReferenceStage(full_model, SPAN, max_context=16), hidden)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
