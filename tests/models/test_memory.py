"""Memory estimates, the check before a stage loads, and the model summary (models/memory.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from shoal.models.errors import InsufficientMemoryError
from shoal.models.gguf import GGUFModel
from shoal.models.memory import (
    check_fits,
    describe,
    kv_bytes_per_token,
    largest_context,
    memory_need,
    model_summary,
)
from shoal.models.span import LayerSpan

from tests.models.family_gguf import write_family_gguf
from tests.models.shared_model import gguf_model

WHOLE = LayerSpan(0, 30)


def test_kv_cache_grows_with_tokens_and_layers() -> None:
    cfg = gguf_model().config
    assert kv_bytes_per_token(cfg, WHOLE) == 2 * 30 * 3 * 64 * 4  # f32 builds: fp32 pages
    for quantization in ("q4_1", "native", "auto"):  # quantized builds: fp16 pages (models/llama.py)
        assert kv_bytes_per_token(cfg, WHOLE, quantization) == 2 * 30 * 3 * 64 * 2
    small, big = (memory_need(gguf_model(), WHOLE, n, quantization="q4_1") for n in (256, 4096))
    assert small.kv_cache == 256 * 2 * 30 * 3 * 64 * 2
    assert big.weights == small.weights and big.kv_cache == 16 * small.kv_cache
    half = memory_need(gguf_model(), LayerSpan(0, 15), 256, quantization="q4_1")
    assert half.kv_cache * 2 == small.kv_cache and half.weights < small.weights


def test_f32_build_holds_more_than_quantized() -> None:
    f32 = memory_need(gguf_model(), WHOLE, 0, quantization="f32").weights
    q4 = memory_need(gguf_model(), WHOLE, 0, quantization="q4_1").weights
    assert f32 > 4 * q4  # fp32 weights + the tied head's own copy vs ~4.5-bit blocks


def test_check_fits_names_the_largest_context() -> None:
    need = memory_need(gguf_model(), WHOLE, 2048, quantization="q4_1")
    assert check_fits(gguf_model(), WHOLE, 2048, quantization="q4_1", available=need.total) == need
    fits = largest_context(gguf_model(), WHOLE, need.total - 1, quantization="q4_1")
    assert 0 < fits < 2048 and fits % 16 == 0
    assert memory_need(gguf_model(), WHOLE, fits, quantization="q4_1").total <= need.total - 1
    with pytest.raises(InsufficientMemoryError, match=rf"smol\.gguf: layers 0:30 need about .* for 2048 "
                                                      rf"context tokens .* the largest context that fits is "
                                                      rf"{fits} tokens"):
        check_fits(gguf_model(), WHOLE, 2048, quantization="q4_1", available=need.total - 1,
                   source="smol.gguf")
    with pytest.raises(InsufficientMemoryError, match="not even its weights"):
        check_fits(gguf_model(), WHOLE, 2048, available=64 << 20)


def test_largest_context_is_capped_by_the_trained_context() -> None:
    assert largest_context(gguf_model(), WHOLE, 1 << 40) == gguf_model().config.context_length


def test_summary_of_the_embedded_model() -> None:
    summary = model_summary(gguf_model(), quantization="q4_1", tokens=2048)
    assert summary["architecture"] == "llama" and summary["quantization"] == "Q4_1"
    assert summary["parameters"] == 134_515_008 and summary["context_length"] == 8192
    assert summary["memory_tokens"] == 2048 and summary["memory_bytes"] > 0


def test_workspace_counts_the_gate_up_output_only_where_it_is_not_fused(tmp_path: Path) -> None:
    """A build that fuses the gate_up projection with its activation (one integer block type) holds no [2F]
    fp32 output: its chunk's workspace is 2 × intermediate × chunk fp32 values smaller."""
    from shoal.models.memory import CPU_PREFILL_CHUNK, fused_gate_up

    cfg = gguf_model().config
    assert fused_gate_up(gguf_model(), WHOLE, "q4_1") and fused_gate_up(gguf_model(), WHOLE, "native")
    assert not fused_gate_up(gguf_model(), WHOLE, "f32")
    fused, plain = (memory_need(gguf_model(), WHOLE, 0, quantization=q).workspace for q in ("q4_1", "f32"))
    assert plain - fused == 2 * cfg.intermediate_size * CPU_PREFILL_CHUNK * 4
    f32_file = write_family_gguf("llama", tmp_path / "f.gguf")  # F32 matrices: the plain matmul
    assert not fused_gate_up(GGUFModel.open(f32_file), LayerSpan(0, 1), "native")


def test_describe_reads_a_file(tmp_path: Path) -> None:
    path = write_family_gguf("gemma3", tmp_path / "g.gguf")
    summary = describe(path)
    assert summary["architecture"] == "gemma3" and summary["quantization"] == "F32"
    assert summary["parameters"] == sum(GGUFModel.open(path).tensor_info(n).n_elements
                                        for n in GGUFModel.open(path).tensor_names())


@pytest.mark.parametrize("quantization", ["f32", "q4_1", "native"])
def test_kv_estimate_follows_the_compiled_cache(quantization: str) -> None:
    """The estimate counts the element type the compiled CPU build gives its KV cache."""
    pytest.importorskip("tvm")
    import numpy as np
    from shoal.models.llama import kv_cache_dtype
    from tvm.target import Target

    cfg = gguf_model().config
    element = np.dtype(kv_cache_dtype(quantization, Target("llvm"))).itemsize
    assert kv_bytes_per_token(cfg, WHOLE, quantization) == 2 * 30 * 3 * 64 * element
    assert kv_cache_dtype(quantization, Target("cuda")) == "float32"
