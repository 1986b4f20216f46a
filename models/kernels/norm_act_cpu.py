"""Vectorised CPU kernels for the small per-token ops of a decoder layer: RMSNorm and SiLU(gate)·up.

Generic schedules leave these as scalar loops with a libm call per element (`sqrtf`, `expf`). Here every row
is 16-lane vector code: RMSNorm sums squares in a vector accumulator (tree-reduced), SiLU uses a polynomial
`exp` (Cephes' exp2f, ~2e-7 relative). Rows are split over the threads when there are enough of them.
"""

from __future__ import annotations

import functools

from shoal.models.kernels.tir_common import f32x16 as _f32
from shoal.models.kernels.tir_common import vexp, vsum
from tvm import tirx
from tvm.script import tirx as T

LANES = 16
SERIAL_ROWS = 8
"""Below this many rows (decode) the kernels run single-threaded: waking the pool costs more."""


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
        if rows < SERIAL_ROWS:
            for m in range(rows):
                row(x, weight, y, m)
        else:
            for m in T.parallel(rows):
                row(x, weight, y, m)

    return rms_norm


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def silu_mul_func(dim: int) -> tirx.PrimFunc:
    """x fp32 [M, 2F] (gate then up, as a fused gate_up projection returns them) -> y [M, F] =
    silu(gate) · up."""
    if dim % LANES:
        raise ValueError(f"silu_mul: width {dim} is not a multiple of {LANES}")
    chunks = dim // LANES

    @T.macro
    def row(x, y, m):
        for c in range(chunks):
            g = T.meta_var(x[m, T.Ramp(c * LANES, 1, LANES)])
            up = T.meta_var(x[m, T.Ramp(dim + c * LANES, 1, LANES)])
            y[m, T.Ramp(c * LANES, 1, LANES)] = g / (_f32(1.0) + vexp(_f32(0.0) - g)) * up

    @T.prim_func(private=True)
    def silu_mul(var_x: T.handle, var_y: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, 2 * dim), "float32")
        y = T.match_buffer(var_y, (rows, dim), "float32")
        if rows < SERIAL_ROWS:
            for m in range(rows):
                row(x, y, m)
        else:
            for m in T.parallel(rows):
                row(x, y, m)

    return silu_mul
