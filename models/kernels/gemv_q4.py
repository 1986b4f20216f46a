"""Decode kernels (a few rows of activations): per-group int8 activation quantization, and the quantized
GEMV y[B, N] = x[B, K] · Wᵀ over Q4_1 / Q8_0 weights in the 16-row interleaved layout.

Each PrimFunc is generated for one weight shape (N, K); the batch B is symbolic (int64). The weight row
blocks are split over the CPU threads; every activation row re-reads the row block's weights from L1.
"""

from __future__ import annotations

import functools
from typing import Any

from shoal.models.kernels.quant import GROUP, ROWS
from shoal.models.kernels.tir_common import LANES, group_dot, group_finish, row_vec
from tvm import tirx
from tvm.script import tirx as T

SERIAL_ROWS = 16
"""quantize_act runs single-threaded below this many rows."""


def check_shape(n: int, k: int, kind: str) -> None:
    if kind not in ("q4_1", "q8_0"):
        raise ValueError(f"unknown weight kind {kind!r}: expected 'q4_1' or 'q8_0'")
    if n % ROWS or k % GROUP:
        raise ValueError(f"shape [{n}, {k}]: rows must be a multiple of {ROWS}, columns of {GROUP}")


def matmul_entry(body: Any, kind: str, n: int, k: int, out: int | None = None) -> tirx.PrimFunc:
    """The PrimFunc around a quantized matmul `body` macro (gemv, gemm): arguments xq, xd, xds, qweight,
    scale, [min (q4_1)], y fp32 [B, `out`] (default N; N / 2 for the gated kernels, gated_matmul.py), with B
    symbolic (int64)."""
    out = n if out is None else out
    blocks, groups, words = n // ROWS, k // GROUP, 4 if kind == "q4_1" else 8

    @T.prim_func(private=True)
    def matmul_q4_1(var_xq: T.handle, var_xd: T.handle, var_xds: T.handle, var_qw: T.handle,
                    var_scale: T.handle, var_min: T.handle, var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        xq = T.match_buffer(var_xq, (batch, k // 4), "int32")
        xd = T.match_buffer(var_xd, (batch, groups), "float32")
        xds = T.match_buffer(var_xds, (batch, groups), "float32")
        qw = T.match_buffer(var_qw, (blocks, groups, words, LANES), "uint32")
        scale = T.match_buffer(var_scale, (blocks, groups, LANES), "float16")
        wmin = T.match_buffer(var_min, (blocks, groups, LANES), "float16")
        y = T.match_buffer(var_y, (batch, out), "float32")
        body(xq, xd, xds, qw, scale, wmin, y, batch)

    @T.prim_func(private=True)
    def matmul_q8_0(var_xq: T.handle, var_xd: T.handle, var_xds: T.handle, var_qw: T.handle,
                    var_scale: T.handle, var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        xq = T.match_buffer(var_xq, (batch, k // 4), "int32")
        xd = T.match_buffer(var_xd, (batch, groups), "float32")
        xds = T.match_buffer(var_xds, (batch, groups), "float32")
        qw = T.match_buffer(var_qw, (blocks, groups, words, LANES), "uint32")
        scale = T.match_buffer(var_scale, (blocks, groups, LANES), "float16")
        y = T.match_buffer(var_y, (batch, out), "float32")
        body(xq, xd, xds, qw, scale, scale, y, batch)  # q8_0 ignores the min

    return matmul_q4_1 if kind == "q4_1" else matmul_q8_0


def _quantize_row(groups: int):
    """TVMScript macro quantizing activation row `b` (see `quantize_act_func`)."""

    @T.macro
    def row(x, xq, xd, xds, b):
        sc = T.alloc_buffer((2,), "float32", scope="global")  # d, 1/d
        for g in range(groups):
            xv = T.meta_var(x[b, T.Ramp(g * GROUP, 1, GROUP)])
            amax = T.meta_var(T.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fmax", T.fabs(xv)))
            sc[0] = amax / T.float32(127)
            sc[1] = T.Select(sc[0] > T.float32(0), T.float32(1) / sc[0], T.float32(0))
            q = T.meta_var(T.round(xv * T.Broadcast(sc[1], GROUP)))
            xq[b, T.Ramp(g * 8, 1, 8)] = T.reinterpret("int32x8", T.Cast("int8x32", q))
            xd[b, g] = sc[0]
            qsum = T.meta_var(
                T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", T.Cast("int32x32", q)))
            xds[b, g] = sc[0] * T.Cast("float32", qsum)

    return row


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def quantize_act_func(k: int) -> tirx.PrimFunc:
    """x fp32 [B, K] -> xq int32 [B, K/4] (4 int8 per word), xd fp32 [B, K/32], xds fp32 [B, K/32].

    Per group of 32 (as llama.cpp's Q8_1): xd = max|x|/127, q = round(x * (1/xd)) (ties to even),
    xds = xd * sum(q). Vector code: one 32-lane load, LLVM vector reductions for max|x| and sum(q).
    """
    if k % GROUP:
        raise ValueError(f"activation width {k} is not a multiple of {GROUP}")
    groups = k // GROUP

    row = _quantize_row(groups)

    @T.prim_func(private=True)
    def quantize_act(var_x: T.handle, var_xq: T.handle, var_xd: T.handle, var_xds: T.handle):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        x = T.match_buffer(var_x, (batch, k), "float32")
        xq = T.match_buffer(var_xq, (batch, k // 4), "int32")
        xd = T.match_buffer(var_xd, (batch, groups), "float32")
        xds = T.match_buffer(var_xds, (batch, groups), "float32")
        if batch < SERIAL_ROWS:  # decode: waking the thread pool costs more than the work
            for b in range(batch):
                row(x, xq, xd, xds, b)
        else:
            for b in T.parallel(batch):
                row(x, xq, xd, xds, b)

    return quantize_act


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def gemv_func(kind: str, n: int, k: int, vnni: bool, fused: bool = False) -> tirx.PrimFunc:
    """y fp32 [B, N] = x · Wᵀ from quantized activations (see `quantize_act_func`) and packed weights.

    Arguments: xq, xd, xds, qweight, scale, [min (q4_1)], y. With `fused`, the function takes x fp32 [B, K]
    instead of (xq, xd, xds) and quantizes it itself (single-threaded, into a workspace buffer) before the
    parallel GEMV: one kernel call and one VM tensor per linear layer instead of two calls and four."""
    check_shape(n, k, kind)
    blocks, groups = n // ROWS, k // GROUP

    @T.macro
    def body(xq, xd, xds, qw, scale, wmin, y, batch):
        for nb in T.parallel(blocks):
            acc = T.alloc_buffer((LANES,), "float32", scope="global")
            for b in range(batch):
                acc[T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for g in range(groups):
                    acc[T.Ramp(0, 1, LANES)] = group_finish(
                        kind, acc[T.Ramp(0, 1, LANES)], group_dot(kind, vnni, qw, nb, g, xq, b),
                        row_vec(scale, nb, g), row_vec(wmin, nb, g), xd[b, g], xds[b, g])
                y[b, T.Ramp(nb * ROWS, 1, LANES)] = acc[T.Ramp(0, 1, LANES)]

    if not fused:
        return matmul_entry(body, kind, n, k)
    return fused_entry(body, kind, n, k)


def fused_entry(body: Any, kind: str, n: int, k: int, out: int | None = None) -> tirx.PrimFunc:
    """The PrimFunc around a GEMV `body` that takes x fp32 [B, K] and quantizes it itself (single-threaded,
    into workspace buffers) first: arguments x, qweight, scale, [min (q4_1)], y fp32 [B, `out`]."""
    out = n if out is None else out
    blocks, groups, words = n // ROWS, k // GROUP, 4 if kind == "q4_1" else 8
    row = _quantize_row(groups)

    @T.prim_func(private=True)
    def gemv_x_q4_1(var_x: T.handle, var_qw: T.handle, var_scale: T.handle, var_min: T.handle,
                    var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        x = T.match_buffer(var_x, (batch, k), "float32")
        qw = T.match_buffer(var_qw, (blocks, groups, words, LANES), "uint32")
        scale = T.match_buffer(var_scale, (blocks, groups, LANES), "float16")
        wmin = T.match_buffer(var_min, (blocks, groups, LANES), "float16")
        y = T.match_buffer(var_y, (batch, out), "float32")
        xq = T.alloc_buffer((batch, k // 4), "int32", scope="global")
        xd = T.alloc_buffer((batch, groups), "float32", scope="global")
        xds = T.alloc_buffer((batch, groups), "float32", scope="global")
        for b in range(batch):
            row(x, xq, xd, xds, b)
        body(xq, xd, xds, qw, scale, wmin, y, batch)

    @T.prim_func(private=True)
    def gemv_x_q8_0(var_x: T.handle, var_qw: T.handle, var_scale: T.handle, var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        x = T.match_buffer(var_x, (batch, k), "float32")
        qw = T.match_buffer(var_qw, (blocks, groups, words, LANES), "uint32")
        scale = T.match_buffer(var_scale, (blocks, groups, LANES), "float16")
        y = T.match_buffer(var_y, (batch, out), "float32")
        xq = T.alloc_buffer((batch, k // 4), "int32", scope="global")
        xd = T.alloc_buffer((batch, groups), "float32", scope="global")
        xds = T.alloc_buffer((batch, groups), "float32", scope="global")
        for b in range(batch):
            row(x, xq, xd, xds, b)
        body(xq, xd, xds, qw, scale, scale, y, batch)  # q8_0 ignores the min

    return gemv_x_q4_1 if kind == "q4_1" else gemv_x_q8_0
