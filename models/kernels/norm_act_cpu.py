"""Vectorised CPU kernels for the small per-token ops of a decoder layer: RMSNorm, SiLU(gate)·up and
GELU_tanh(gate)·up.

Generic schedules leave these as scalar loops with a libm call per element (`sqrtf`, `expf`, `tanhf`). Here
every row is 16-lane vector code: RMSNorm sums squares in a vector accumulator (fused multiply-adds per lane,
then halving lane sums), the activations use a polynomial `exp` (Cephes' exp2f, ~2e-7 relative). A call runs
on one thread below `SERIAL_ELEMENTS` outputs (decode) and splits its rows over the threads above.

The arithmetic, written as LLVM compiles it on an FMA target (fp contraction on; models/reference_quant.py
reproduces it bit for bit):
- rms_norm: acc[l] = fma(x, x, acc[l]) over the row's 16-lane chunks in order, s = halving sum of the 16
  lanes, inv = 1 / sqrt(s / D + eps), y = (x · inv) · w.
- silu_mul: y = (g / (1 + exp2p((0 − g) · log2 e))) · up.
- gelu_mul: GELU_tanh(g) = g · (1 + tanh(u)) / 2 = g · sigmoid(2u), u = √(2/π)(g + 0.044715 g³), so
  z = g · fma(g·g, B, A) with A = −2√(2/π)·log2 e, B = 0.044715·A (z = −2u·log2 e), then
  y = (g / (1 + exp2p(z))) · up. One exp, no tanh; against the exact tanh-GELU (float64) the activation is
  within 1e-6 · max(|GELU(g)|, 1e-3) for |g| ≤ 12 (`GELU_ERROR`; measured 7.5e-7 over 2M points, tested):
  exp2p's ~2e-7 plus the fp32 rounding of z. (The fp32 formula 0.5·g·(1 + tanhf(u)) loses 1.5e-4 of that
  scale to the cancellation in 1 + tanh near g ≈ −3.)
exp2p is tir_common.vexp2 (inputs clamped to [-126, 127], so the activations saturate cleanly: g / (1 + 2^127)
for large negative arguments, g / (1 + 2^-126) = g for large positive ones).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from shoal.models.kernels.tir_common import f32x16 as _f32
from shoal.models.kernels.tir_common import vexp, vexp2, vsum
from tvm import tirx
from tvm.script import tirx as T

LANES = 16
SERIAL_ELEMENTS = 16384
"""Below this many outputs per call (decode: a row of up to a few thousand features, or a token's Q/K heads
for the per-head norm) the kernels run single-threaded: waking the pool costs more than the work."""
GELU_A = -2.0 * math.sqrt(2.0 / math.pi) / math.log(2.0)
GELU_B = 0.044715 * GELU_A
"""gelu_mul's z = g · (A + B·g²) = −2u · log2 e (module docstring), as fp32 constants in the kernel."""
GELU_ERROR = 1e-6
"""gelu_mul's activation against the exact tanh-GELU: |err| ≤ GELU_ERROR · max(|GELU(g)|, 1e-3), |g| ≤ 12."""


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def rms_norm_func(dim: int, eps: float) -> tirx.PrimFunc:
    """x fp32 [M, D], weight fp32 [D] -> y [M, D] = x / sqrt(mean(x²) + eps) · weight."""
    if dim % LANES:
        raise ValueError(f"rms_norm: dim {dim} is not a multiple of {LANES}")
    chunks = dim // LANES

    @T.macro
    def row(x, weight, y, m):
        acc = T.alloc_buffer((LANES,), "float32", scope="global")
        inv = T.alloc_buffer((1,), "float32", scope="global")
        acc[T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for c in range(chunks):
            acc[T.Ramp(0, 1, LANES)] = acc[T.Ramp(0, 1, LANES)] + x[m, T.Ramp(c * LANES, 1, LANES)] * x[
                m, T.Ramp(c * LANES, 1, LANES)]
        inv[0] = T.float32(1) / T.sqrt(vsum(acc[T.Ramp(0, 1, LANES)]) / T.float32(dim) + T.float32(eps))
        for c in range(chunks):
            y[m, T.Ramp(c * LANES, 1, LANES)] = x[m, T.Ramp(c * LANES, 1, LANES)] * T.Broadcast(
                inv[0], LANES) * weight[T.Ramp(c * LANES, 1, LANES)]

    @T.prim_func(private=True)
    def rms_norm(var_x: T.handle, weight: T.Buffer((dim,), "float32"), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, dim), "float32")
        y = T.match_buffer(var_y, (rows, dim), "float32")
        if rows * dim < SERIAL_ELEMENTS:
            for m in range(rows):
                row(x, weight, y, m)
        else:
            for m in T.parallel(rows):
                row(x, weight, y, m)

    return rms_norm


def _gated_func(dim: int, name: str, activation: Any) -> tirx.PrimFunc:
    """x fp32 [M, 2F] (gate then up, as a fused gate_up projection returns them) -> y [M, F] =
    activation(gate) · up, `activation` building the float32x16 expression of one gate vector."""
    if dim % LANES:
        raise ValueError(f"{name}: width {dim} is not a multiple of {LANES}")
    chunks = dim // LANES

    @T.macro
    def row(x, y, m):
        for c in range(chunks):
            g = T.meta_var(x[m, T.Ramp(c * LANES, 1, LANES)])
            up = T.meta_var(x[m, T.Ramp(dim + c * LANES, 1, LANES)])
            y[m, T.Ramp(c * LANES, 1, LANES)] = activation(g) * up

    @T.prim_func(private=True)
    def gated(var_x: T.handle, var_y: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, 2 * dim), "float32")
        y = T.match_buffer(var_y, (rows, dim), "float32")
        if rows * dim < SERIAL_ELEMENTS:
            for m in range(rows):
                row(x, y, m)
        else:
            for m in T.parallel(rows):
                row(x, y, m)

    return gated


def _silu(g: tirx.PrimExpr) -> tirx.PrimExpr:
    return g / (_f32(1.0) + vexp(_f32(0.0) - g))


def _gelu_tanh(g: tirx.PrimExpr) -> tirx.PrimExpr:
    z = g * (g * g * _f32(GELU_B) + _f32(GELU_A))  # = -2u·log2 e; g·g·B + A contracts to one fma
    return g / (_f32(1.0) + vexp2(z))


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def silu_mul_func(dim: int) -> tirx.PrimFunc:
    """x fp32 [M, 2F] (gate then up) -> y [M, F] = silu(gate) · up."""
    return _gated_func(dim, "silu_mul", _silu)


@functools.cache
def gelu_mul_func(dim: int) -> tirx.PrimFunc:
    """x fp32 [M, 2F] (gate then up) -> y [M, F] = gelu_tanh(gate) · up (GeGLU, gemma3; module docstring)."""
    return _gated_func(dim, "gelu_mul", _gelu_tanh)


GATED = {"silu": silu_mul_func, "gelu_tanh": gelu_mul_func}
"""models/config.py's `activation` -> the gated kernel's factory."""
ACTIVATIONS = {"silu": _silu, "gelu_tanh": _gelu_tanh}
"""models/config.py's `activation` -> the float32x16 expression of one gate vector: the GEMMs that fuse the
gated activation into the gate_up projection (gated_matmul.py) apply it exactly as the kernels above."""
