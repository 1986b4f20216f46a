"""What a model needs in memory, checked before a stage loads, and a one-line summary of a model file.

Estimates (bytes) for a stage running `span` with a KV cache of `tokens` positions over all sequences:
- weights: the span's tensors as the build keeps them — fp32 for `f32` (plus the transposed copy of a tied
  head) and the reference, about their GGUF size for quantized builds (blocks repacked, norms fp32);
- KV cache: 2 (K and V) × layers × kv_heads × head_dim × 2 bytes per token — quantized builds keep fp16
  pages on the CPU (models/llama.py `kv_cache_dtype`), `f32` builds (and the reference) fp32, 4 bytes;
  sliding-window layers with their own cache (gemma3 on the CPU, models/sliding_cache.py) count at most the
  window plus one prefill chunk (whole pages) per sequence, not every position (`kv_cache_bytes`);
- workspace: one prefill chunk's activations (8 × hidden, QKV, the intermediate-sized act(gate)·up and,
  where the build does not fuse the gate_up projection with its activation (`fused_gate_up`), its [2 ×
  intermediate] output, fp32: unfused ~47 MB a 512-token chunk of Qwen2.5-0.5B, measured 38–50, 44 MiB a
  256-token chunk of Llama-3.2-1B, measured 46; fused 28 MiB for that chunk, measured ~20) and one row of
  logits (prefill computes the last position's only), plus a fixed runtime overhead. One chunk: the stage
  hands TVM's pooled buffers back when the chunk length changes (models/runtime.py).

`check_fits` compares the total with the memory available now (MemAvailable) and raises
`InsufficientMemoryError` naming the file, the need, what is free and the largest context that fits.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from shoal.models.config import ModelConfig
from shoal.models.errors import InsufficientMemoryError
from shoal.models.sliding_cache import separate_sliding_cache, sliding_cache_keeps, sliding_cache_tokens
from shoal.models.span import LayerSpan

RUNTIME_OVERHEAD = 128 << 20
"""Python, NumPy, TVM's runtime and shoal's modules in a serving process: ~72 MiB resident before the
weights (measured: TVM's runtime through tvm_ffi, models/tvm_runtime.py; docs/models.md "Peak RSS"), plus a
tokenizer (~32 MiB for a 49k vocabulary) and allocator slack. A process that compiles in-process (the full
TVM) holds ~230 MB more."""
CPU_PREFILL_CHUNK = 256
"""Tokens per prefill VM call of a CPU `CompiledStage` unless told (longer prompts are split; CUDA: 512,
models/runtime.py); the engine's chunk too (models/generate.py). The VM's prefill workspace (activations,
resident while its pool holds them) grows with the chunk, ~0.18 MiB a token for Llama-3.2-1B (23 MiB at 128,
46 at 256, 89 at 512), on top of a full KV cache in a long fill. 128 would save 23 MiB more but split a
200-token prompt in two and cost its prefill ~25% (docs/models.md "Peak RSS at a 4k context")."""
KV_BYTES = {"f32": 4}
"""Bytes of one KV-cache element per quantization; 2 (fp16) for the others."""
PAGE = 16


@dataclass(frozen=True)
class MemoryNeed:
    weights: int
    kv_cache: int
    workspace: int
    tokens: int
    """KV-cache positions the estimate is for."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace


def kv_bytes_per_token(config: ModelConfig, span: LayerSpan, quantization: str = "f32") -> int:
    """K and V of one position over the span's layers, in the build's KV element type (CUDA builds keep
    fp32 pages in GPU memory; this counts the CPU's)."""
    return 2 * len(span) * config.num_kv_heads * config.head_dim * KV_BYTES.get(quantization, 2)


def kv_cache_bytes(config: ModelConfig, span: LayerSpan, tokens: int, quantization: str = "f32", *,
                   prefill_chunk: int = CPU_PREFILL_CHUNK, sequences: int = 1) -> int:
    """KV bytes of `tokens` positions over `sequences` sequences: the full-attention layers keep every
    position; where the build keeps the sliding layers apart (CPU builds, models/sliding_cache.py), those hold
    at most `sliding_cache_tokens` positions (the window plus the runtime's prefill chunk, capped below the
    window, in whole pages, per sequence)."""
    per_layer = kv_bytes_per_token(config, LayerSpan(0, 1), quantization)
    if not separate_sliding_cache(config, span, "llvm"):
        return per_layer * len(span) * tokens
    sliding = sum(config.is_sliding(i) for i in range(span.start, span.stop))
    keeps = sliding_cache_keeps(config)
    chunk = min(prefill_chunk, max(1, config.sliding_window - 1))  # CompiledStage's cap for sliding layers
    held = min(tokens, sliding_cache_tokens(keeps, chunk, sequences, tokens, PAGE))
    return per_layer * ((len(span) - sliding) * tokens + sliding * held)


def weight_bytes(index: Any, span: LayerSpan, quantization: str = "f32") -> int:
    """Resident bytes of the span's weights (`index`: a GGUFIndex or GGUFModel)."""
    total = 0
    for name in index.tensor_names_for_span(span):
        info = index.tensor_info(name)
        total += info.n_elements * 4 if quantization == "f32" or len(info.shape) == 1 else info.size
    config: ModelConfig = index.config
    if quantization == "f32" and span.is_last(config.num_layers) and config.tie_embeddings:
        total += config.vocab_size * config.hidden_size * 4  # the head's own transposed copy
    return total


_FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


def fused_gate_up(index: Any, span: LayerSpan, quantization: str = "f32") -> bool:
    """Whether a CPU build of `span` runs each MLP's gate_up projection fused with its activation (no [2F]
    fp32 output: models/kernels/relax_blocks.py `gated_projection`): quantized builds whose gate and up
    weights have one integer block type in every layer (phi3's single gate_up tensor: its type), with the
    intermediate size a multiple of 16; never `f32` builds."""
    c: ModelConfig = index.config
    if quantization == "f32" or c.intermediate_size % 16:
        return False
    if quantization == "q4_1":
        return True
    tensors = set(index.tensor_names())
    for layer in range(span.start, span.stop):
        names = [f"blk.{layer}.{part}.weight" for part in ("ffn_gate", "ffn_up")]
        types = {index.tensor_info(n).type.name for n in names if n in tensors}
        if len(types) != 1 or types & _FLOAT_TYPES:
            return False
    return True


def memory_need(index: Any, span: LayerSpan, tokens: int, *, quantization: str = "f32",
                prefill_chunk: int = CPU_PREFILL_CHUNK, sequences: int = 1) -> MemoryNeed:
    """`tokens` KV positions over at most `sequences` sequences at once (the sliding layers' bound is per
    sequence: several long sequences hold it each)."""
    c: ModelConfig = index.config
    # fp32 activations a token: hidden-sized ones (the residual, norms, attention and projection outputs: the
    # pool keeps one buffer per distinct size and live tensor), QKV, act(gate)·up and, where the build does
    # not fuse it away (`fused_gate_up`), the [2F] gate_up projection. Measured for Llama-3.2-1B: ~0.18 MiB
    # a token unfused, ~0.08 fused (the prefill GEMM then hands the down GEMM int8 activations, so the
    # product's F fp32 values counted here are ~4x what it holds: kept as margin); 38–50 MB a 512-token
    # chunk of Qwen2.5-0.5B unfused
    gated = 1 if fused_gate_up(index, span, quantization) else 3
    width = c.hidden_size * 8 + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + gated * c.intermediate_size
    logits = c.vocab_size * 4 if span.is_last(c.num_layers) else 0
    workspace = prefill_chunk * width * 4 + logits + RUNTIME_OVERHEAD
    kv = kv_cache_bytes(c, span, tokens, quantization, prefill_chunk=prefill_chunk, sequences=sequences)
    return MemoryNeed(weight_bytes(index, span, quantization), kv, workspace, tokens)


@functools.cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own symbols: glibc's
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_freed_heap() -> None:
    """Return the C heap's free pages to the system (glibc `malloc_trim(0)`; a no-op elsewhere). Large
    buffers freed after the heap's mmap threshold rose (glibc raises it as big blocks are freed) stay in the
    heap, resident, until trimmed: the weight packing's temporaries and the VM's freed prefill workspaces."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def available_bytes() -> int:
    """Memory the system can give now without swapping (Linux MemAvailable)."""
    return int(psutil.virtual_memory().available)


def largest_context(index: Any, span: LayerSpan, available: int, *, quantization: str = "f32",
                    prefill_chunk: int = CPU_PREFILL_CHUNK) -> int:
    """Most KV-cache tokens (a multiple of the 16-token page, at most the trained context) that fit in
    `available` bytes; 0 when not even the weights fit."""
    config: ModelConfig = index.config
    base = memory_need(index, span, 0, quantization=quantization, prefill_chunk=prefill_chunk)
    # the KV cache's bytes grow linearly with the tokens once the sliding layers hold their bound (a page)
    bound = kv_cache_bytes(config, span, config.context_length, quantization, prefill_chunk=prefill_chunk)
    per_token = (bound - kv_cache_bytes(config, span, config.context_length - PAGE, quantization,
                                        prefill_chunk=prefill_chunk)) // PAGE
    fixed = bound - per_token * config.context_length
    room = available - base.total - fixed
    if per_token == 0:  # sliding layers only: the whole context, once their bound fits
        return int(config.context_length) if room >= 0 else 0
    if room < per_token * PAGE:
        return 0
    return int(min(room // per_token // PAGE * PAGE, config.context_length))


def check_fits(index: Any, span: LayerSpan, tokens: int, *, quantization: str = "f32",
               prefill_chunk: int = CPU_PREFILL_CHUNK, available: int | None = None,
               source: str = "the model", sequences: int = 1) -> MemoryNeed:
    """The need of a stage for `tokens` KV positions over up to `sequences` sequences;
    `InsufficientMemoryError` if it exceeds `available` (default: what the system has free now)."""
    need = memory_need(index, span, tokens, quantization=quantization, prefill_chunk=prefill_chunk,
                       sequences=sequences)
    free = available_bytes() if available is None else available
    if need.total <= free:
        return need
    fits = largest_context(index, span, free, quantization=quantization, prefill_chunk=prefill_chunk)
    advice = (f"the largest context that fits is {fits} tokens (max_total_tokens={fits})" if fits
              else "not even its weights and workspace fit: use a quantized build or fewer layers")
    raise InsufficientMemoryError(
        f"{source}: layers {span} need about {_gib(need.total)} for {tokens} context tokens (weights "
        f"{_gib(need.weights)}, KV cache {_gib(need.kv_cache)}, workspace {_gib(need.workspace)}), but "
        f"{_gib(free)} is available; {advice}")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def model_summary(index: Any, *, quantization: str = "f32", tokens: int | None = None) -> dict[str, Any]:
    """Architecture, quantization (the most common block type of the matrices), parameter count, trained
    context and memory the whole model needs at `tokens` KV positions (default: the trained context)."""
    c: ModelConfig = index.config
    counts: dict[str, int] = {}
    params = 0
    for name in index.tensor_names():
        info = index.tensor_info(name)
        params += info.n_elements
        if len(info.shape) == 2:
            counts[info.type.name] = counts.get(info.type.name, 0) + info.n_elements
    kind = max(counts, key=lambda k: counts[k]) if counts else "-"
    whole = LayerSpan.whole(c.num_layers)
    need = memory_need(index, whole, tokens or c.context_length, quantization=quantization)
    return {"architecture": c.architecture, "quantization": kind, "parameters": int(params),
            "context_length": c.context_length, "memory_bytes": need.total, "memory_tokens": need.tokens}


def describe(path: str | Path, *, tokens: int | None = None) -> dict[str, Any]:
    """`model_summary` of a local GGUF file (reads its header only)."""
    from shoal.models.gguf import read_gguf_index

    with Path(path).open("rb") as fh:
        def read(offset: int, n: int) -> bytes:
            fh.seek(offset)
            return fh.read(n)

        return model_summary(read_gguf_index(read), quantization="native", tokens=tokens)
