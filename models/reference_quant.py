"""NumPy forward of the compiled q4_1 CPU build, bit for bit: the oracle its kernels are tested against.

`QuantizedReferenceStage` is `ReferenceStage` (same `Stage` protocol and KV cache) whose hooks reproduce the
compiled model's arithmetic. A 1-ulp difference anywhere is not harmless here: it can flip the rounding of
one activation in step 1 below, which moves that value by a whole quantization step (large in the groups
holding this model's outlier features), and the flips cascade — a reference with only the matmuls exact and
NumPy's own norm/attention/SiLU agreed with the compiled build no better than fp32 does (~1 logit). So:

Matmuls (models/kernels/gemv_q4.py, gemm_q4.py: decode GEMV, prefill GEMM and the Q8_0 tied head compute
the same per row), over the GGUF's Q4_1 / Q8_0 blocks repacked as the kernels read them (kernels/quant.py):
1. Activations per row and group of 32 (`quantize_activations`, as llama.cpp's Q8_1): fp32 xd = max|x|/127,
   inv = 1/xd (0 when xd is 0), xq = round-half-to-even(x·inv) as int8, xds = xd·float(Σ xq).
2. Per group, the exact integer dot product of the weight codes (Q4_1: nibbles 0..15; Q8_0: biased bytes
   q+128) with xq (VNNI `vpdpbusd`; here fp32 matmuls of integers below 2^24, exact in any order).
3. Groups finish in fp32 in order g = 0, 1, ..., fp16 d and m widened, dxd = fp32(d·xd); LLVM contracts the
   kernels' expressions into fused multiply-adds: Q4_1 acc = fma(m, xds, fma(dot, dxd, acc)); Q8_0
   acc = acc + fma(dot, dxd, -fp32(d·(128·xds))).
The rest: RMSNorm and SiLU·up as kernels/norm_act_cpu.py computes them (`kernel_rms_norm`: per-lane fma
sums of squares, halving lane sum, 1/sqrt(Σ/D + eps), (x·inv)·w; `kernel_silu_mul`: x / (1 + polynomial
exp2) · up; gemma3's GELU·up `kernel_gelu_mul`), RoPE (kernels/rope_cpu.py: libm exp2f/cosf/sinf angles, fma
rotation) and attention (kernels/attention_cpu.py: blocks of 16 keys, online softmax with libm exp2f
rescales, a polynomial exp2, fma chains and halving lane sums). The embedding (Q8_0 rows dequantized) and
residual adds are exact.
The KV cache is float16 (models/llama.py `kv_cache_dtype`): Q/K/V are rounded to fp16 as they enter it
(round to nearest even, as `vcvtps2ph`), RoPE widens them, rotates in fp32 and rounds again, attention
widens its inputs and its output is rounded to fp16 once (`kv_round`).

An fma is emulated in float64 (the product of two fp32 values is exact there; one rounding to fp32 remains,
a double rounding that differs from a single one with probability ~2^-29). libm's expf/exp2f/cosf/sinf are
matched by rounding float64 results, asking libm itself (ctypes) for values near a rounding midpoint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from shoal.models.errors import UnsupportedModelError
from shoal.models.gguf import GGUFModel
from shoal.models.kernels.quant import (
    GROUP,
    PackedWeight,
    concat_packed,
    pack_q4_1,
    pack_q8_0,
    quantize_activations,
    unpack_codes,
)
from shoal.models.reference import ReferenceStage, head_tensor_name
from shoal.models.span import LayerSpan

_F32 = np.float32
ROW_BLOCK = 64
"""Activation rows per matmul pass (bounds the float64 temporaries of a long prefill)."""
LANES = 16
"""Vector width of the attention kernels, and their key block (KV page) size."""
_PACKERS = {"q4_1": pack_q4_1, "q8_0": pack_q8_0}
_EXP2_POLY = tuple(_F32(c) for c in (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3,
                                      5.550332471162809e-2, 2.402264791363012e-1, 6.931472028550421e-1))
"""models/kernels/tir_common.py `vexp2`'s coefficients, as the fp32 constants the kernel uses."""
_MIDPOINT_BAND = 0.01
"""glibc's expf/exp2f are within 0.502 ULP, so they can round unlike the correctly rounded value only where
the exact value lies within 0.002 ULP of a midpoint; values within this band are sent to libm itself."""


KV_DTYPE = np.float16
"""The compiled CPU build's KV cache element type for quantized builds (models/llama.py `kv_cache_dtype`)."""


def kv_round(a: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the KV cache's element type and widened back (exact)."""
    return np.asarray(a, _F32).astype(KV_DTYPE).astype(_F32)


# ---------------------------------------------------------------- matmuls over the packed blocks

@dataclass(frozen=True)
class QuantizedMatrix:
    """A packed weight W [N, K] laid out for NumPy: per group, the codes the kernel multiplies."""

    kind: str
    """"q4_1" or "q8_0"."""
    codes: np.ndarray
    """float32 [G, N, 32]: integer codes, 0..15 (q4_1) or the biased bytes q+128 in 0..255 (q8_0)."""
    scale: np.ndarray
    """float32 [G, N]: the blocks' fp16 scale d, widened."""
    min: np.ndarray | None
    """float32 [G, N]: the blocks' fp16 min m (q4_1), widened; None for q8_0."""

    @classmethod
    def from_packed(cls, w: PackedWeight) -> QuantizedMatrix:
        groups = w.in_features // GROUP
        codes = unpack_codes(w).reshape(w.out_features, groups, GROUP).transpose(1, 0, 2)
        return cls(w.kind, np.ascontiguousarray(codes, dtype=_F32), _per_group(w.scale),
                   None if w.min is None else _per_group(w.min))

    @property
    def in_features(self) -> int:
        return self.codes.shape[0] * GROUP


def _per_group(a: np.ndarray) -> np.ndarray:
    """float16 [N/16, G, 16] (kernel layout) -> float32 [G, N]."""
    blocks, groups, rows = a.shape
    return np.ascontiguousarray(a.astype(_F32).transpose(1, 0, 2).reshape(groups, blocks * rows))


def _round_add(total: np.ndarray, addend: np.ndarray) -> None:
    """total (fp32, in place) = fp32(total + addend), added in float64 and rounded once: with `addend` an
    exact float64 product, this is an fma."""
    np.add(addend, total, out=total, casting="same_kind")


def _matmul_rows(x: np.ndarray, w: QuantizedMatrix) -> np.ndarray:
    xq, xd, xds = quantize_activations(x)  # [B, K], [B, G], [B, G]
    xg = xq.reshape(x.shape[0], -1, GROUP).transpose(1, 2, 0).astype(_F32)  # [G, 32, B]
    # codes·xqᵀ runs 2-4x faster in OpenBLAS than xq·codesᵀ; the rest works on [G, B, N] (N innermost),
    # one group at a time so the float64 temporaries stay in cache.
    dots = np.matmul(w.codes, xg).transpose(0, 2, 1)
    dxd = w.scale[:, None, :] * xd.T[:, :, None]  # fp32 d·xd
    acc = np.zeros(dots.shape[1:], _F32)
    exact = np.empty(dots.shape[1:], np.float64)
    if w.kind == "q8_0":
        bias = w.scale[:, None, :] * (xds.T * _F32(128.0))[:, :, None]  # fp32 d·(128·xds)
        term = np.empty_like(acc)
        for g in range(dots.shape[0]):
            np.multiply(dots[g], dxd[g], out=exact, dtype=np.float64)
            np.subtract(exact, bias[g], out=term, casting="same_kind")  # fma(dot, dxd, -bias)
            acc += term
        return acc
    assert w.min is not None
    xds_column = xds.T[:, :, None]
    for g in range(dots.shape[0]):
        np.multiply(dots[g], dxd[g], out=exact, dtype=np.float64)
        _round_add(acc, exact)  # fma(dot, dxd, acc)
        np.multiply(w.min[g], xds_column[g], out=exact, dtype=np.float64)
        _round_add(acc, exact)  # fma(m, xds, acc)
    return acc


def quantized_matmul(x: np.ndarray, w: QuantizedMatrix) -> np.ndarray:
    """y fp32 [B, N] = x [B, K] · Wᵀ exactly as the compiled CPU kernels compute it (module docstring)."""
    x = np.ascontiguousarray(x, dtype=_F32)
    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"activations {list(x.shape)} do not fit a weight of {w.in_features} inputs")
    parts = [_matmul_rows(x[i:i + ROW_BLOCK], w) for i in range(0, x.shape[0], ROW_BLOCK)]
    return np.ascontiguousarray(np.concatenate(parts))


def load_quantized_matrix(model: GGUFModel, names: list[str]) -> QuantizedMatrix:
    """Tensors `names` (Q4_1 or Q8_0, one kind) stacked along the output axis, as the compiled build packs
    them (models/runtime.py)."""
    packed = []
    for name in names:
        info = model.tensor_info(name)
        kind = info.type.name.lower()
        if kind not in _PACKERS:
            raise UnsupportedModelError(f"tensor {name} is {info.type.name}; the quantized reference reads "
                                        "Q4_1 and Q8_0 blocks only (use ReferenceStage)")
        out_features, in_features = info.shape
        packed.append(_PACKERS[kind](np.asarray(model.raw(name)), out_features, in_features))
    return QuantizedMatrix.from_packed(packed[0] if len(packed) == 1 else concat_packed(packed))


# ---------------------------------------------------------------- the other ops' fp32 rounding

def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fp32 fused multiply-add a·b + c (fp32 operands, broadcasting) with one rounding."""
    out = np.multiply(a, b, dtype=np.float64)
    out += c
    return out.astype(_F32)


@functools.cache
def _libm() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for name in ("expf", "exp2f", "cosf", "sinf"):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return lib


def _libm_call(name: str, x: np.ndarray) -> np.ndarray:
    fn = getattr(_libm(), name)
    return np.array([fn(float(v)) for v in np.ravel(x)], _F32).reshape(np.shape(x))


def _libm_like(name: str, exact: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """fp32 libm `name`(x) (expf, exp2f): the float64 value rounded, with libm itself asked where that value
    lies within `_MIDPOINT_BAND` ULP of a rounding midpoint."""
    x = np.asarray(x, _F32)
    with np.errstate(over="ignore", invalid="ignore"):
        y64 = exact(x.astype(np.float64))
        y = y64.astype(_F32)
        off = y64 - y
        gap = np.where(off < 0, y - np.nextafter(y, _F32(-np.inf)).astype(np.float64),
                       np.nextafter(y, _F32(np.inf)).astype(np.float64) - y)
        hard = np.isfinite(y) & (np.abs(np.abs(off) - gap / 2) < _MIDPOINT_BAND * gap)
    if hard.any():
        y[hard] = _libm_call(name, x[hard])
    return y


def kernel_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """The CPU build's RMSNorm over the last axis D: for D % 16 == 0 the vector kernel
    (kernels/norm_act_cpu.py: per lane l, acc[l] = fma(x, x, acc[l]) over the 16-lane chunks in order, the
    lanes summed by halving, inv = 1/sqrt(Σ/D + eps), (x·inv)·weight), else TVM's legalized `rms_norm`
    (`nn.RMSNorm`, which llama.py keeps for other widths: Σx² in order by fma, then (inv·x)·weight)."""
    x = np.asarray(x, _F32)
    dim = x.shape[-1]
    if dim % LANES == 0:
        chunks = x.reshape(*x.shape[:-1], dim // LANES, LANES)
        acc = np.zeros((*x.shape[:-1], LANES), _F32)
        for c in range(dim // LANES):
            acc = fma32(chunks[..., c, :], chunks[..., c, :], acc)
        total = _vsum(acc)
    else:
        squares = np.ascontiguousarray(np.square(x, dtype=np.float64).T)  # [D, rows], exact
        total = np.zeros(x.shape[:-1], _F32)
        for column in squares:
            _round_add(total, column)
    inv = _F32(1) / np.sqrt(total / _F32(dim) + _F32(eps))
    return (x * inv[..., None]) * weight


_LOG2E = _F32(1.0 / math.log(2.0))
"""tir_common.vexp's factor log2 e as the fp32 constant the kernels use."""
_GELU_A = _F32(-2.0 * math.sqrt(2.0 / math.pi) / math.log(2.0))
_GELU_B = _F32(0.044715 * (-2.0 * math.sqrt(2.0 / math.pi) / math.log(2.0)))
"""norm_act_cpu.GELU_A / GELU_B as fp32 constants."""


def kernel_silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """kernels/norm_act_cpu.py `silu_mul`: (gate / (1 + exp2p(−gate · log2 e))) · up, exp2p the polynomial
    `_vexp2` (1 + exp2p is one fma in the kernel, p·2^n + 1: equal, 2^n scaling being exact)."""
    gate = np.asarray(gate, _F32)
    with np.errstate(over="ignore"):
        e = _vexp2((_F32(0) - gate) * _LOG2E)
    return (gate / (_F32(1) + e)) * up


def kernel_gelu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """kernels/norm_act_cpu.py `gelu_mul` (tanh-GELU as g · sigmoid(2u)): z = g · fma(g·g, B, A),
    (g / (1 + exp2p(z))) · up."""
    gate = np.asarray(gate, _F32)
    with np.errstate(over="ignore", invalid="ignore"):
        z = gate * fma32(gate * gate, _GELU_B, _GELU_A)
        e = _vexp2(z)
    return (gate / (_F32(1) + e)) * up


@functools.cache
def _rope_table(theta: float, dim: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [D/2] at `position` as models/kernels/rope_cpu.py computes them (libm exp2f, cosf, sinf)."""
    step = _F32(-2.0 * math.log2(theta) / dim) * np.arange(dim // 2, dtype=_F32)
    angle = _F32(position) * _F32(1.0) * _libm_call("exp2f", step)
    return _libm_call("cosf", angle), _libm_call("sinf", angle)


def kernel_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """models/kernels/rope_cpu.py on x [n, heads, D]: pairs (2i, 2i+1) rotated with fused multiply-adds."""
    tables = [_rope_table(float(theta), x.shape[-1], int(p)) for p in positions]
    cos = np.stack([c for c, _ in tables])[:, None, :]
    sin = np.stack([s for _, s in tables])[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = fma32(cos, even, -(sin * odd))
    out[..., 1::2] = fma32(sin, even, cos * odd)
    return out


def _vsum(v: np.ndarray) -> np.ndarray:
    """Sum over the last axis (16 lanes) by halving, as tir_common.vsum: lanes [0, h) + [h, 2h)."""
    while v.shape[-1] > 1:
        half = v.shape[-1] // 2
        v = v[..., :half] + v[..., half:]
    return v[..., 0]


def _vexp2(x: np.ndarray) -> np.ndarray:
    """tir_common.vexp2: 2^n · p(f), the polynomial evaluated with fused multiply-adds."""
    t = np.maximum(np.minimum(x, _F32(127)), _F32(-126))
    n = np.floor(t + _F32(0.5))
    f = t - n
    poly = np.full_like(f, _EXP2_POLY[0])
    for c in _EXP2_POLY[1:]:
        poly = fma32(poly, f, c)
    return fma32(poly, f, _F32(1)) * np.ldexp(_F32(1), n.astype(np.int32))


def _scores(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """q [T, D] · keys [T, 16, D] -> [T, 16]: a fused multiply-add chain over 16-lane chunks, then `_vsum`."""
    total = q[:, None, :LANES] * keys[:, :, :LANES]
    for c in range(LANES, q.shape[-1], LANES):
        total = fma32(q[:, None, c:c + LANES], keys[:, :, c:c + LANES], total)
    return _vsum(total)


def kernel_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, visible: np.ndarray,
                     scale: float, sequence: np.ndarray | None = None) -> np.ndarray:
    """models/kernels/attention_cpu.py (decode and ragged prefill) for q [m, H, D] -> [m, H·D].

    keys/values [S, KV, T, D] hold S sequences from position 0 (T a multiple of 16, zero-padded); query r
    belongs to sequence `sequence[r]` (default 0) and sees its keys [0, visible[r]). One task per (query,
    head): keys in blocks of 16, one online-softmax rescale (libm exp2f) per block, probabilities by
    `_vexp2`, the output accumulated by fma in key order."""
    m, heads, dim = q.shape
    tasks = m * heads
    qt = q.reshape(tasks, dim)
    seq = np.repeat(np.zeros(m, np.intp) if sequence is None else np.asarray(sequence), heads)
    kv_head = np.tile(np.arange(heads) // (heads // keys.shape[1]), m)
    seen = np.repeat(np.asarray(visible), heads)
    factor = _F32(scale) * _F32(math.log2(math.e))
    run_max, run_sum = np.full(tasks, _F32(-5e4)), np.zeros(tasks, _F32)
    acc = np.zeros((tasks, dim), _F32)
    for start in range(0, int(seen.max()), LANES):
        rows = np.clip(seen - start, 0, LANES)
        valid = np.arange(LANES)[None, :] < rows[:, None]
        k_blk = keys[seq, kv_head, start:start + LANES]  # [tasks, 16, D]
        s = _scores(qt, k_blk) * factor
        blk_max = np.maximum(np.where(valid, s, _F32(-np.inf)).max(axis=1), _F32(-5e4))
        grow = (rows > 0) & (blk_max > run_max)
        if grow.any():
            ratio = _libm_like("exp2f", np.exp2, run_max[grow] - blk_max[grow])
            run_sum[grow] *= ratio
            acc[grow] *= ratio[:, None]
            run_max[grow] = blk_max[grow]
        p = np.where(valid, _vexp2(s - run_max[:, None]), _F32(0))
        run_sum = run_sum + _vsum(p)
        weighted = np.multiply(p[:, :, None], values[seq, kv_head, start:start + LANES], dtype=np.float64)
        for i in range(LANES):
            _round_add(acc, weighted[:, i])  # acc = fma(p_i, v_i, acc), in key order
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(run_sum[:, None] > 0, acc / run_sum[:, None], _F32(0))
    return out.reshape(m, heads * dim).astype(_F32)


def padded_kv(caches: list[np.ndarray], length: int) -> np.ndarray:
    """[S, KV, T, D] from per-sequence [KV, >= t, D] arrays, T = `length` rounded up to 16, zero-padded."""
    kv_heads, _, dim = caches[0].shape
    out = np.zeros((len(caches), kv_heads, -(-length // LANES) * LANES, dim), _F32)
    for i, c in enumerate(caches):
        t = min(c.shape[1], length)
        out[i, :, :t] = c[:, :t]
    return out


# ---------------------------------------------------------------- the stage

class QuantizedReferenceStage(ReferenceStage):
    """A `Stage` computing layers `span` of `model` as the compiled q4_1 CPU build does, in NumPy (module
    docstring). Norms and the embedding table come from `load` (fp32; a Q8_0 embedding dequantizes exactly
    as the embedding kernel does); every weight matrix, the head included, is read from the GGUF's blocks.
    Attention matches the compiled kernels for a prefill into an empty sequence and for decode steps; a
    prefill appended to a non-empty sequence (which the compiled cache merges from two kernels) is computed
    the same way and may differ from it by float rounding. Decode ≈ 2 batched steps/s on 2 cores."""

    def __init__(self, model: GGUFModel, span: LayerSpan, *, max_context: int | None = None,
                 load: Callable[[str], np.ndarray] | None = None) -> None:
        self._model = model
        super().__init__(model, span, max_context=max_context, load=load)

    def _load_head(self, load: Callable[[str], np.ndarray]) -> QuantizedMatrix:
        return self._load_matrix(load, [head_tensor_name(self.config)])

    def _load_matrix(self, load: Callable[[str], np.ndarray], names: list[str]) -> QuantizedMatrix:
        del load  # the blocks, not fp32 values
        return load_quantized_matrix(self._model, names)

    def _project(self, x: np.ndarray, weight: QuantizedMatrix) -> np.ndarray:
        return quantized_matmul(x, weight)

    def _norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return kernel_rms_norm(x, weight, self.config.rms_eps)

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Q and K enter the fp16 cache (rounded), are rotated in fp32 and stored rounded again."""
        return kv_round(kernel_rope(kv_round(x), positions, self.config.rope_theta))

    def _gated(self, gate_up: np.ndarray) -> np.ndarray:
        ffn = self.config.intermediate_size
        kernel = kernel_gelu_mul if self.config.activation == "gelu_tanh" else kernel_silu_mul
        return kernel(gate_up[:, :ffn], gate_up[:, ffn:])

    def _attend_rows(self, li: int, q: np.ndarray, rows: list) -> np.ndarray:
        """All sequences' queries in one `kernel_attention` call (same result as one call each)."""
        stops = [cache.length + sl.stop - sl.start for cache, _, sl in rows]
        keys = padded_kv([cache.k[li] for cache, _, _ in rows], max(stops))  # rounded by `_rope`
        values = kv_round(padded_kv([cache.v[li] for cache, _, _ in rows], max(stops)))
        visible = np.empty(q.shape[0], np.intp)
        sequence = np.empty(q.shape[0], np.intp)
        for i, (cache, _, sl) in enumerate(rows):
            visible[sl] = cache.length + 1 + np.arange(sl.stop - sl.start)
            sequence[sl] = i
        return kv_round(kernel_attention(q, keys, values, visible, 1.0 / math.sqrt(q.shape[-1]), sequence))

    def _attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, past: int) -> np.ndarray:
        visible = past + 1 + np.arange(q.shape[0])
        return kv_round(kernel_attention(q, padded_kv([keys], keys.shape[1]),
                                         kv_round(padded_kv([values], values.shape[1])), visible,
                                         1.0 / math.sqrt(q.shape[-1])))

    def __repr__(self) -> str:
        return f"QuantizedReferenceStage(span={self.span}, sequences={len(self.sequence_ids())})"
