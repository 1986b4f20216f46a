"""Gemma 3's sliding-window layers in their own KV cache, bounded to the window (models/sliding_cache.py).

A gemma3-shaped file (tests/models/family_gguf.py: 7 layers, 5 local + 1 global + 1 local) with a 32-token
window (slow; the default suite takes the fixtures' 8-token window, whose build test_families.py compiles
too): a 200-token prompt goes in chunks of window − 1 (the runtime's cap) and 32 greedy steps decode past the
window, batched with a 45-token sequence. The compiled f32 build (fp32 KV, the reference's arithmetic) must
give the NumPy reference's logits and greedy tokens — for the whole model and for three chained shards, one
starting mid-model with sliding layers only, one holding the global layer — while its sliding cache is created
smaller than the positions the sequences reach, so it only works if TVM recycles the pages that slid out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shoal.models.gguf import GGUFModel
from shoal.models.memory import kv_bytes_per_token, kv_cache_bytes, largest_context, memory_need
from shoal.models.reference import ReferenceStage
from shoal.models.sliding_cache import separate_sliding_cache, sliding_cache_keeps
from shoal.models.span import LayerSpan

from tests.models import family_gguf
from tests.models.test_family_blocks import Chain

WINDOW = 32
PROMPTS = (200, 45)
"""Two sequences: one whose prompt crosses the window in several chunks, one shorter, decoded as a batch."""
STEPS = 32
TOLERANCE = 2e-4
"""Max |Δlogit| against the reference (fp32 both; the compiled kernels sum in another order: ~3e-6 seen)."""
SLIDING_TOKENS = {8: 2 * 32, 32: 2 * 80}
"""The sliding cache of a stage with max_batch_size 2: per sequence window − 1 kept + a chunk of window − 1,
in pages, plus a page (8: 14 -> 2 pages; 32: 62 -> 5 pages); fewer than the 232 positions reached."""


@pytest.fixture(scope="module")
def gemma_files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("sliding")
    files = {}
    for window in (8, WINDOW):
        path = folder / f"gemma3-w{window}.gguf"
        patch = pytest.MonkeyPatch()
        patch.setattr(family_gguf, "GEMMA3_WINDOW", window)
        try:
            files[window] = family_gguf.write_family_gguf("gemma3", path)
        finally:
            patch.undo()
    return files


def _check_against_reference(model: GGUFModel, stage: Any) -> None:
    """Both prompts prefilled, then STEPS greedy steps of both sequences as one batch: every step's logits
    within TOLERANCE of the reference's, the greedy tokens the same."""
    layers = model.config.num_layers
    reference = ReferenceStage(model, LayerSpan.whole(layers))
    rng = np.random.default_rng(16)
    want, got = [], []
    for seq, n in enumerate(PROMPTS):
        prompt = rng.integers(3, model.config.vocab_size, n)
        for s in (reference, stage):
            s.add_sequence(seq)
        want.append(reference.prefill(seq, prompt))
        got.append(stage.prefill(seq, prompt))
    tokens: list[list[int]] = [[], []]
    for step in range(STEPS + 1):
        for seq in range(len(PROMPTS)):
            gap = float(np.abs(want[seq] - got[seq]).max())
            assert gap < TOLERANCE, f"sequence {seq} at {PROMPTS[seq] + step} positions: max |Δlogit| {gap}"
            assert int(got[seq].argmax()) == int(want[seq].argmax()), (seq, step)
            tokens[seq].append(int(want[seq].argmax()))
        if step == STEPS:
            break
        ids = np.array([t[-1] for t in tokens])
        want = list(reference.decode([0, 1], ids))
        got = list(stage.decode([0, 1], ids))


def _load(model: GGUFModel, span: LayerSpan) -> Any:
    from shoal.models.runtime import CompiledStage

    return CompiledStage.load(model, span, target="llvm", quantization="f32", max_batch_size=2,
                              max_total_tokens=512)


@pytest.mark.parametrize("window", [8, pytest.param(WINDOW, marks=pytest.mark.slow)])
def test_sliding_cache_matches_reference_past_the_window(gemma_files: dict[int, Path], window: int) -> None:
    pytest.importorskip("tvm")
    model = GGUFModel.open(gemma_files[window])
    layers = model.config.num_layers
    assert model.config.sliding_window == window
    assert separate_sliding_cache(model.config, LayerSpan.whole(layers), "llvm")
    assert not separate_sliding_cache(model.config, LayerSpan.whole(layers), "cuda")
    stage = _load(model, LayerSpan.whole(layers))
    try:
        assert stage.prefill_chunk == window - 1
        assert stage.sliding_cache_tokens() == SLIDING_TOKENS[window] < PROMPTS[0] + STEPS
        _check_against_reference(model, stage)
    finally:
        stage.close()


@pytest.mark.slow
def test_sliding_cache_shards_match_reference(gemma_files: dict[int, Path]) -> None:
    """Three chained shards: 0:2 (first, sliding only), 2:5 (mid-model, sliding only: its full cache holds
    one unused layer and numbers the positions), 5:7 (the global layer and a sliding one, the head)."""
    pytest.importorskip("tvm")
    model = GGUFModel.open(gemma_files[WINDOW])
    stages = [_load(model, LayerSpan(a, b)) for a, b in ((0, 2), (2, 5), (5, 7))]
    try:
        assert all(stage.sliding_cache_tokens() == SLIDING_TOKENS[WINDOW] for stage in stages)
        _check_against_reference(model, Chain(stages))
    finally:
        for stage in stages:
            stage.close()


def test_memory_estimate_counts_sliding_layers_at_their_bound(gemma_files: dict[int, Path]) -> None:
    model = GGUFModel.open(gemma_files[WINDOW])
    config, whole = model.config, LayerSpan.whole(model.config.num_layers)
    per_layer = kv_bytes_per_token(config, LayerSpan(0, 1), "native")
    assert sliding_cache_keeps(config) == WINDOW - 1
    # 6 sliding layers held at (31 + 31 rounded up to pages, plus a page) = 80 positions once past them
    for tokens in (256, 512):
        assert kv_cache_bytes(config, whole, tokens, "native") == per_layer * (tokens + 6 * 80)
    assert kv_cache_bytes(config, whole, 40, "native") == per_layer * 7 * 40  # short: every layer holds all
    assert kv_cache_bytes(config, whole, 256, "native", sequences=2) == per_layer * (256 + 6 * 160)
    assert kv_cache_bytes(config, LayerSpan(2, 5), 512, "f32") == 4 * 2 * 2 * 32 * 3 * 80  # sliding only
    need = memory_need(model, whole, 512, quantization="native")
    assert need.kv_cache == per_layer * (512 + 6 * 80)
    fits = largest_context(model, whole, need.total, quantization="native")
    assert fits == 512 and memory_need(model, whole, fits, quantization="native").total <= need.total
    smaller = largest_context(model, whole, need.total - 64 * per_layer, quantization="native")
    assert smaller == 448
    base = memory_need(model, LayerSpan(2, 5), 0, quantization="native").total
    assert largest_context(model, LayerSpan(2, 5), base + 3 * 80 * per_layer,
                           quantization="native") == config.context_length
