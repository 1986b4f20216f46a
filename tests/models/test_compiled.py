"""The compiled TVM runtime (`CompiledStage`) against the NumPy reference (`ReferenceStage`).

Every shard is compiled once per suite run (the shared SHOAL_COMPILE_CACHE) and loaded once per module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tvm  # noqa: F401  (this test process compiles in-process: full TVM, not the runtime-only mode)
from shoal.models.errors import ContextOverflowError
from shoal.models.runtime import CompiledStage
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage

from tests.models.shared_model import (
    PROMPTS,
    chat_ids,
    dequantized,
    fresh_seq_id,
    gguf_model,
    greedy,
    reference_stage,
)

LAYERS = 30
SPLIT = 13
STEPS = 64
LOGIT_TOLERANCE = 1e-3


def _load(start: int, stop: int, **options: Any) -> CompiledStage:
    options.setdefault("quantization", "f32")
    return CompiledStage.load(gguf_model(), LayerSpan(start, stop), target="llvm", load=dequantized,
                              **options)


@pytest.fixture(scope="module")
def whole() -> CompiledStage:
    stage = _load(0, LAYERS)
    yield stage
    stage.close()


@pytest.fixture(scope="module")
def halves() -> tuple[CompiledStage, CompiledStage]:
    first, second = _load(0, SPLIT, max_total_tokens=2048), _load(SPLIT, LAYERS)
    yield first, second
    first.close()
    second.close()


def test_compiled_stage_is_a_stage(whole: CompiledStage) -> None:
    assert isinstance(whole, Stage)
    assert whole.span == LayerSpan(0, LAYERS)
    assert whole.target_kind == whole.target.kind and whole.target_kind in ("llvm", "cuda")
    assert whole.kv_page_size == 16 and whole.max_total_tokens and whole.decode_argmax([0], None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("question", PROMPTS)
def test_compiled_matches_reference(whole: CompiledStage, question: str) -> None:
    prompt = chat_ids(question)
    want_tokens, want_logits = greedy([reference_stage(0, LAYERS)], prompt, STEPS)
    got_tokens, got_logits = greedy([whole], prompt, STEPS)
    for step, (want, got) in enumerate(zip(want_logits, got_logits, strict=True)):
        diff = float(np.max(np.abs(want - got)))
        assert diff <= LOGIT_TOLERANCE, f"step {step}: max |Δlogit| {diff:.2e}"
    assert got_tokens == want_tokens


def test_spans_compose(whole: CompiledStage, halves: tuple[CompiledStage, CompiledStage]) -> None:
    first, second = halves
    hidden_seq = fresh_seq_id()
    first.add_sequence(hidden_seq)
    hidden = first.prefill(hidden_seq, np.asarray(chat_ids("Hi"), dtype=np.int32))
    first.remove_sequence(hidden_seq)
    assert hidden.dtype == np.float32 and hidden.shape == (len(chat_ids("Hi")), 576)
    for question in PROMPTS[:2]:
        prompt = chat_ids(question)
        want, want_logits = greedy([whole], prompt, 32)
        got, got_logits = greedy([first, second], prompt, 32)
        assert got == want
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(want_logits, got_logits, strict=True)) < 1e-3


def test_outputs_outlive_later_calls(halves: tuple[CompiledStage, CompiledStage]) -> None:
    """Decode outputs are views of the call's own tensor (DLPack) and inputs go through a kept tensor: an
    array a call returned must not change when later calls run."""
    first, second = halves
    seq = fresh_seq_id()
    first.add_sequence(seq)
    second.add_sequence(seq)
    try:
        second.prefill(seq, first.prefill(seq, np.asarray(chat_ids("Hi"), dtype=np.int32)))
        hidden = [first.decode([seq], np.array([t], np.int32)) for t in (100, 200, 300)]
        logits = [second.decode([seq], h) for h in hidden]
        kept = [a.copy() for a in hidden + logits]
        for t in (400, 500):
            second.decode([seq], first.decode([seq], np.array([t], np.int32)))
        assert all(np.array_equal(a, b) for a, b in zip(hidden + logits, kept, strict=True))
        assert not np.array_equal(hidden[0], hidden[1]) and not np.array_equal(logits[1], logits[2])
    finally:
        first.remove_sequence(seq)
        second.remove_sequence(seq)


def test_batched_decode_equals_unbatched(whole: CompiledStage) -> None:
    prompts = [chat_ids(q) for q in ("Hello!", "Name a colour.", "Why is the sky blue? Answer briefly.")]
    assert len({len(p) for p in prompts}) == 3
    steps = 8
    singles = [greedy([whole], p, steps) for p in prompts]
    seqs = [fresh_seq_id() for _ in prompts]
    try:
        last = []
        for seq, prompt in zip(seqs, prompts, strict=True):
            whole.add_sequence(seq)
            last.append(whole.prefill(seq, np.asarray(prompt, dtype=np.int32)))
        tokens = [[int(np.argmax(lg))] for lg in last]
        logits = [[lg] for lg in last]
        for _ in range(steps - 1):
            out = whole.decode(seqs, np.asarray([t[-1] for t in tokens], dtype=np.int32))
            assert out.shape == (3, 49152)
            for i in range(3):
                logits[i].append(out[i])
                tokens[i].append(int(np.argmax(out[i])))
        for i, (want_tokens, want_logits) in enumerate(singles):
            assert tokens[i] == want_tokens
            diffs = [float(np.max(np.abs(a - b))) for a, b in zip(want_logits, logits[i], strict=True)]
            assert max(diffs) < 1e-4
            assert whole.sequence_length(seqs[i]) == len(prompts[i]) + steps - 1
    finally:
        for seq in seqs:
            whole.remove_sequence(seq)


def test_long_prefill_is_chunked(halves: tuple[CompiledStage, CompiledStage]) -> None:
    first, _ = halves
    ids = np.asarray((chat_ids("Count to ten.") * 40)[:700], dtype=np.int32)
    seq_a, seq_b = fresh_seq_id(), fresh_seq_id()
    first.add_sequence(seq_a)
    first.add_sequence(seq_b)
    try:
        whole_out = first.prefill(seq_a, ids)  # 700 > prefill_chunk (256 on the CPU): three VM calls
        part = np.concatenate([first.prefill(seq_b, ids[:300]), first.prefill(seq_b, ids[300:])])
        assert whole_out.shape == (700, 576)
        assert float(np.max(np.abs(whole_out - part))) < 1e-3
        assert first.sequence_length(seq_a) == first.sequence_length(seq_b) == 700
    finally:
        first.remove_sequence(seq_a)
        first.remove_sequence(seq_b)


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status (not Linux)")


def test_prefills_of_new_lengths_keep_one_workspace(halves: tuple[CompiledStage, CompiledStage]) -> None:
    """TVM's pooled allocator keeps a freed buffer for its exact size, and a prefill's activations are sized
    by its length: without the stage handing the pool back when the length changes, each new length kept a
    whole workspace resident (~10 MB for ~300 tokens of these 13 layers; ~50 MB a 512-token chunk of a 0.5B
    model)."""
    first, _ = halves
    ids = np.asarray((chat_ids("Count to ten.") * 40)[:400], dtype=np.int32)
    grown = []
    for n in (300, 310, 320, 330):  # each a different size in every activation buffer
        seq = fresh_seq_id()
        first.add_sequence(seq)
        try:
            first.prefill(seq, ids[:n])
        finally:
            first.remove_sequence(seq)
        grown.append(_rss_anon_mb())
    # kept per length: +~10 MB each (+~31 MB over the last three); one workspace: the 30 more KV positions
    # (~1.3 MB at 13 layers) and allocator noise
    assert grown[-1] - grown[0] < 12, f"resident anonymous memory after each prefill: {grown} MB"


def test_errors(halves: tuple[CompiledStage, CompiledStage]) -> None:
    first, second = halves
    seq = fresh_seq_id()
    first.add_sequence(seq)
    try:
        with pytest.raises(ValueError, match="exists already"):
            first.add_sequence(seq)
        with pytest.raises(ValueError, match="non-negative"):
            first.add_sequence(-1)
        with pytest.raises(ValueError, match="unknown sequence"):
            first.decode([seq + 1], np.asarray([1], dtype=np.int32))
        with pytest.raises(ValueError, match="token ids"):
            first.prefill(seq, np.zeros((2, 576), dtype=np.float32))
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 49152\)"):
            first.prefill(seq, np.asarray([49152], dtype=np.int32))
        with pytest.raises(ValueError, match="hidden states"):
            second.prefill(seq, np.asarray([1, 2], dtype=np.int32))
        with pytest.raises(ValueError, match="at least one token"):
            first.prefill(seq, np.asarray([], dtype=np.int32))
        with pytest.raises(ValueError, match="2 input rows for 1 sequences"):
            first.decode([seq], np.asarray([1, 2], dtype=np.int32))
        with pytest.raises(ValueError, match="twice"):
            first.decode([seq, seq], np.asarray([1, 2], dtype=np.int32))
        assert first.sequence_length(seq) == 0
    finally:
        first.remove_sequence(seq)
    first.remove_sequence(seq)  # idempotent


def test_context_overflow_and_close() -> None:
    stage = _load(0, SPLIT, max_total_tokens=32)
    seq = fresh_seq_id()
    stage.add_sequence(seq)
    stage.prefill(seq, np.arange(30, dtype=np.int32))
    with pytest.raises(ContextOverflowError, match="at most 32 tokens"):
        stage.prefill(seq, np.arange(3, dtype=np.int32))
    assert stage.sequence_length(seq) == 30
    stage.decode([seq], np.asarray([5], dtype=np.int32))  # 31 still fits
    stage.close()
    stage.close()
    with pytest.raises(RuntimeError, match="closed"):
        stage.add_sequence(seq + 1)


def test_quantized_build_agrees_with_f32(whole: CompiledStage) -> None:
    """The q4_1 build (weights kept as Q4_1/Q8_0 blocks, activations quantized per 32 like llama.cpp)
    teacher-forced on the f32 build's greedy tokens: top-1 agreement and logit closeness."""
    quantized = CompiledStage.load(gguf_model(), LayerSpan(0, LAYERS), target="llvm", quantization="q4_1")
    try:
        assert quantized.shard.quantization == "q4_1"
        assert all(dtype != "float32" or len(shape) == 1 for _, shape, dtype in quantized.shard.params), \
            "a q4_1 build keeps no fp32 weight matrix"
        agree = total = 0
        for question in PROMPTS[:3]:
            prompt = np.asarray(chat_ids(question), dtype=np.int32)
            tokens, want_logits = greedy([whole], list(prompt), 32)
            seq = fresh_seq_id()
            quantized.add_sequence(seq)
            got = [quantized.prefill(seq, prompt)]
            for token in tokens[:-1]:
                got.append(quantized.decode([seq], np.asarray([token], dtype=np.int32))[0])
            quantized.remove_sequence(seq)
            for want, have in zip(want_logits, got, strict=True):
                total += 1
                agree += int(np.argmax(want) == np.argmax(have))
                assert float(np.max(np.abs(want - have))) < 4.0
        assert agree / total >= 0.9, f"top-1 agreement {agree}/{total}"
    finally:
        quantized.close()


def _cuda_or_skip() -> None:
    from shoal.models.targets import cuda_available

    if not cuda_available():
        pytest.skip("no CUDA device here")


@pytest.mark.gpu
def test_cuda_f32_matches_reference() -> None:
    _cuda_or_skip()
    stage = CompiledStage.load(gguf_model(), LayerSpan(0, LAYERS), target="cuda", quantization="f32",
                               load=dequantized)
    try:
        assert stage.target.kind == "cuda"
        prompt = chat_ids(PROMPTS[0])
        want_tokens, want_logits = greedy([reference_stage(0, LAYERS)], prompt, 16)
        got_tokens, got_logits = greedy([stage], prompt, 16)
        assert got_tokens == want_tokens
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(want_logits, got_logits, strict=True)) < 2e-3
    finally:
        stage.close()


@pytest.mark.gpu
def test_cuda_quantized_agrees_with_reference() -> None:
    _cuda_or_skip()
    stage = CompiledStage.load(gguf_model(), LayerSpan(0, LAYERS), target="cuda", quantization="q4_1")
    try:
        prompt = chat_ids(PROMPTS[1])
        tokens, want_logits = greedy([reference_stage(0, LAYERS)], prompt, 32)
        seq = fresh_seq_id()
        stage.add_sequence(seq)
        got = [stage.prefill(seq, np.asarray(prompt, dtype=np.int32))]
        for token in tokens[:-1]:
            got.append(stage.decode([seq], np.asarray([token], dtype=np.int32))[0])
        agree = sum(int(np.argmax(a) == np.argmax(b)) for a, b in zip(want_logits, got, strict=True))
        assert agree / len(got) >= 0.9, f"top-1 agreement {agree}/{len(got)}"
    finally:
        stage.close()


CHILD = """
import json, re, sys
import numpy as np
from shoal.models.embedded import embedded_model_path
from shoal.models.gguf import GGUFModel
from shoal.models.runtime import CompiledStage
from shoal.models.span import LayerSpan
model = GGUFModel.open(embedded_model_path())
stage = CompiledStage.load(model, LayerSpan(0, 30), target="llvm", quantization="q4_1")
model.close()
stage.add_sequence(0)
logits = stage.prefill(0, np.asarray(json.loads(sys.argv[1]), dtype=np.int32))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) forking test process.
peak_mb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
# the runtime through tvm_ffi only (models/tvm_runtime.py): no `import tvm`, no compiler library
libs = {line.split()[-1].rsplit("/", 1)[-1] for line in open("/proc/self/maps") if "libtvm" in line}
runtime_only = "tvm" not in sys.modules and "libtvm_runtime.so" in libs and "libtvm_compiler.so" not in libs
print(json.dumps({"runtime_only": runtime_only, "logits": logits[:64].tolist(),
                  "argmax": int(logits.argmax()), "peak_mb": peak_mb}))
"""


def test_serving_process_loads_only_the_tvm_runtime() -> None:
    """A process that has not imported TVM compiles in a child and runs the library with TVM's runtime only,
    without importing the tvm package (~230 MB less resident memory), with the same results as an
    in-process load."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    prompt = chat_ids(PROMPTS[0])
    env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_TVM_RUNTIME_ONLY", "TVM_USE_RUNTIME_LIB")}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(prompt)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["runtime_only"] is True
    here = CompiledStage.load(gguf_model(), LayerSpan(0, LAYERS), target="llvm", quantization="q4_1")
    try:
        seq = fresh_seq_id()
        here.add_sequence(seq)
        logits = here.prefill(seq, np.asarray(prompt, dtype=np.int32))
        assert child["argmax"] == int(logits.argmax())
        assert np.allclose(child["logits"], logits[:64], atol=1e-4)
    finally:
        here.close()
    assert child["peak_mb"] < 350, f"peak RSS {child['peak_mb']:.0f} MB (issue 3: `shoal chat` <= 350 MB)"
