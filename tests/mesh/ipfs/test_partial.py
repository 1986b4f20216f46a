"""Partial pull: a node that runs layers [10, 20) of the default model fetches only the blocks covering the
GGUF header and those layers' tensors, and the sparse file it writes runs those layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from multiformats import CID

from mesh.ipfs.catalog import EMBEDDED_CID, EMBEDDED_NAME
from mesh.ipfs.cid import block_key
from mesh.ipfs.reader import decode_file_node
from mesh.ipfs.service import IpfsService
from mesh.ipfs.store import BlockStore
from models.embedded import embedded_model_path
from models.gguf import READ_CHUNK, GGUFModel
from models.span import LayerSpan
from tests.mesh.ipfs.conftest import offline_config, start_gateway

SPAN = LayerSpan(10, 20)


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


@pytest.fixture(scope="module")
def full_model() -> GGUFModel:
    return GGUFModel.open(embedded_model_path())


async def test_partial_pull_of_layers_10_to_20_touches_only_their_blocks_and_runs(
    tmp_path: Path, full_model: GGUFModel
) -> None:
    async with IpfsService(offline_config(), tmp_path / "a") as node_a:
        root = await node_a.ensure_embedded()
        assert str(root) == EMBEDDED_CID  # the catalog's built-in CID is what the importer computes
        assert await node_a.ensure_embedded() == root  # second start: already there
        runner, url = await start_gateway(node_a)
        try:
            async with IpfsService(offline_config(gateways=(url,)), tmp_path / "b") as node_b:
                sparse_path = await node_b.pull_span(EMBEDDED_NAME, SPAN)
                stats = node_b.last_span_stats
        finally:
            await runner.cleanup()

    index = full_model.index
    tensor_ranges = index.byte_ranges_for_span(SPAN)
    least = covering_blocks(node_a.store, root, [(0, index.data_start), *tensor_ranges])
    most = covering_blocks(node_a.store, root, [(0, index.data_start + READ_CHUNK), *tensor_ranges])
    fetched = {path.name for path in node_b.store.keys()}
    all_blocks = {path.name for path in node_a.store.keys()}
    assert least <= fetched <= most, (len(least), len(fetched), len(most))
    assert stats is not None and stats.blocks_fetched == len(fetched)
    assert len(fetched) < len(all_blocks) // 2  # 10 of 30 layers: far fewer blocks than the file's 380
    print(f"partial pull of layers {SPAN}: {len(fetched)} of {len(all_blocks)} blocks")

    sparse = GGUFModel.open(sparse_path)
    assert sparse_path.stat().st_size == embedded_model_path().stat().st_size
    assert sparse.index.tensors == index.tensors
    for name in sparse.tensor_names_for_span(SPAN):
        assert np.array_equal(sparse.raw(name), full_model.raw(name)), name
    outside = "blk.25.ffn_down.weight"
    assert not np.array_equal(sparse.raw(outside), full_model.raw(outside))  # really not fetched

    from models.reference import ReferenceStage

    hidden = np.random.default_rng(0).standard_normal((3, full_model.config.hidden_size)).astype(np.float32)
    outputs = []
    for model in (sparse, full_model):
        stage = ReferenceStage(model, SPAN, max_context=16)
        stage.add_sequence(0)
        outputs.append(stage.prefill(0, hidden))
        stage.close()
    assert np.array_equal(outputs[0], outputs[1])

    # The TVM-compiled stage for the span loads from the partial file and matches the reference.
    from models.runtime import CompiledStage

    compiled = CompiledStage.load(sparse, SPAN, target="llvm")
    try:
        compiled.add_sequence(0)
        got = compiled.prefill(0, hidden)
    finally:
        compiled.close()
    assert got.shape == outputs[1].shape
    np.testing.assert_allclose(got, outputs[1], rtol=1e-3, atol=1e-3)

