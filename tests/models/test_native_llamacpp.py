"""The native build against llama.cpp on the embedded SmolLM2 re-quantized to other block types
(scripts/requantize_gguf.py; llama.cpp's outputs in tests/fixtures/llamacpp_native.json from
scripts/make_native_fixtures.py): teacher-forced on llama.cpp's greedy tokens, our logits at llama.cpp's
top-8 ids stay within the type's tolerance, the top-1 agrees wherever llama.cpp's margin exceeds it, and free
greedy decoding repeats llama.cpp's 32 tokens up to the first step whose margin is within it.

Tolerances (logits; SmolLM2's logits span ~±30): shoal and llama.cpp both round activations to int8 per block
before the integer dot products, but not identically — llama.cpp's Q8_0 rounds halves away from zero, its Q8_K
(the K-quants' activations) scales per 256 inputs instead of 32, and its F32 build of the same weights
differs from ours by fp32 summation order. In this model one activation code moved at one layer cascades
(its outlier feature groups amplify it): the f32 build, exact weights and fp32 activations, is itself
TOL_FLOOR away from llama.cpp on these files. Per type the bound is the measured maximum over the fixture's
160 steps, rounded up by ~25% (measurements in docs/kernels.md).

The fixture's llama.cpp ran with an F32 KV cache; shoal's quantized builds keep fp16 pages (models/llama.py
`kv_cache_dtype`), and that rounding is one more such perturbation: llama.cpp itself, switched to its default
F16 cache, is 1.06 / 1.50 / 1.21 / 1.77 from this fixture (Q4_0 / Q8_0 / Q5_0 / Q4_K_M) with the medians
unchanged. The Q4_0 and Q8_0 bounds are the fp16 build's measured maxima (1.48, 1.98) rounded up as above.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import tvm  # noqa: F401  (imported first: CompiledStage.load then compiles in-process, full TVM)
from shoal.models.embedded import embedded_model_path
from shoal.models.gguf import GGUFModel
from shoal.models.runtime import CompiledStage
from shoal.models.span import LayerSpan

from scripts.requantize_gguf import requantize
from tests.models.shared_model import greedy, teacher_forced

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "llamacpp_native.json"
TOLERANCE = {"q4_0": 1.85, "q8_0": 2.5, "q5_0": 2.0, "q4_k_m": 3.0}
"""Max |Δlogit| against llama.cpp over its top-8 ids, per file type (see the module docstring)."""
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="the Q4_K_M file needs llama.cpp's quantizer (llama-cpp-python)")
KINDS = [
    pytest.param("q4_0"),
    pytest.param("q8_0", marks=pytest.mark.slow),
    pytest.param("q5_0", marks=pytest.mark.slow),
    pytest.param("q4_k_m", marks=[pytest.mark.slow, needs_llama_cpp]),
]


@cache
def _fixture() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_native_build_agrees_with_llamacpp(kind: str, tmp_path: Path) -> None:
    want = _fixture()["files"][kind]
    path = tmp_path / f"{kind}.gguf"
    requantize(embedded_model_path(), path, kind)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want["gguf_sha256"], (
        "the re-quantized file differs from the fixture's: regenerate with scripts/make_native_fixtures.py")
    tolerance = TOLERANCE[kind]
    stage = CompiledStage.load(GGUFModel.open(path), LayerSpan(0, 30), target="llvm", quantization="native",
                               cache_dir=tmp_path / "cache")
    try:
        worst, hits, steps = 0.0, 0, 0
        for case in want["cases"]:
            rows = teacher_forced(stage, case["prompt_ids"], case["tokens"])
            for row, ids, logits in zip(rows, case["top_ids"], case["top_logits"], strict=True):
                worst = max(worst, float(np.abs(row[ids] - np.asarray(logits)).max()))
                hits += int(np.argmax(row) == ids[0])
                steps += 1
                if logits[0] - logits[1] > tolerance:
                    margin = logits[0] - logits[1]
                    assert int(np.argmax(row)) == ids[0], f"{kind}: top-1 differs at a margin of {margin:.2f}"
            free = greedy([stage], case["prompt_ids"], len(case["tokens"]))[0]
            for step, logits in enumerate(case["top_logits"]):
                if logits[0] - logits[1] <= tolerance:
                    break  # a near tie: past it the two engines may continue differently
                assert free[step] == case["tokens"][step], f"{kind}: greedy token {step} differs"
        print(f"native {kind} vs llama.cpp: max |Δlogit| {worst:.3f} over top-8, top-1 {hits / steps:.3f}")
        assert worst <= tolerance
    finally:
        stage.close()
