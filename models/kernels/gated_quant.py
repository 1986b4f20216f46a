"""Prefill's gate_up GEMM fused with its gated activation *and* the down projection's activation quantization:
x's quantized activations and the gate_up weight [2F, K] in, the down GEMM's quantized activations of
act(gate) · up out — (xq int32 [M, F/4], xd fp32 [M, F/32] and, for the generic down kernels (qmatmul), xs
int32 [M, F/16]; for the tuned Q4_1 / Q8_0 ones (gemm_q4), xds fp32 [M, F/32]). Neither the [M, 2F] gate_up
output nor the [M, F] fp32 activation exists (8 MiB more of a 256-token chunk of Llama-3.2-1B than
gated_matmul's GEMM keeps).

A thread takes a pair of gate blocks — the 32 columns of one activation group — with their up blocks. Per
tile of rows it accumulates each block as the plain kernels do (qmatmul.group_update for the generic block
types, tir_common.group_dot/group_finish for the tuned Q4_1 / Q8_0), forms act(gate) · up (norm_act_cpu's
`ACTIVATIONS`) for the 32 columns, and quantizes each row's group as qmatmul.quantize_act_sums_func /
gemv_q4.quantize_act_func do: bit for bit the gated GEMM, then the quantization kernel
(tests/models/test_gated_matmul.py).
"""

from __future__ import annotations

import functools
from typing import Any

from shoal.models.kernels.blocks import GROUP, ROWS, check_shape
from shoal.models.kernels.gated_matmul import _activation, gated_blocks
from shoal.models.kernels.gemm_q4 import CHAINS
from shoal.models.kernels.gemv_q4 import check_shape as check_tuned_shape
from shoal.models.kernels.qmatmul import CHUNK, TILE, group_update, param_shapes, qweight_shape
from shoal.models.kernels.tir_common import LANES, group_dot, group_finish, row_vec
from tvm import tirx
from tvm.script import tirx as T

OUT_FORMATS = ("sums", "scaled")
"""The down kernel's activation format: "sums" (qmatmul: integer sums per half group, xs int32 [M, F/16]),
"scaled" (gemm_q4: xds = xd · Σq, fp32 [M, F/32])."""


def _lanes(count: int = LANES) -> tirx.PrimExpr:
    return tirx.Ramp(0, 1, count)


def _quantize_group(scaled: bool) -> Any:
    """TVMScript macro: vals [tile, 32] row i (act(gate)·up of the group's 32 columns) -> xq, xd, x3 of `row`,
    group p, with the arithmetic of qmatmul._quantize_row (sums) or gemv_q4._quantize_row (scaled)."""

    @T.macro
    def quantize(vals, i, xq, xd, x3, row, p):
        sc = T.alloc_buffer((2,), "float32", scope="global")  # d, 1/d
        xv = T.meta_var(vals[i, _lanes(GROUP)])
        amax = T.meta_var(T.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fmax", T.fabs(xv)))
        sc[0] = amax / T.float32(127)
        sc[1] = T.Select(sc[0] > T.float32(0), T.float32(1) / sc[0], T.float32(0))
        q = T.meta_var(T.round(xv * T.Broadcast(sc[1], GROUP)))
        xq[row, T.Ramp(p * 8, 1, 8)] = T.reinterpret("int32x8", T.Cast("int8x32", q))
        xd[row, p] = sc[0]
        if scaled:
            total = T.meta_var(T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add",
                                                       T.Cast("int32x32", q)))
            x3[row, p] = sc[0] * T.Cast("float32", total)
        else:
            for h in range(2):
                qh = T.meta_var(T.round(vals[i, T.Ramp(h * 16, 1, 16)] * T.Broadcast(sc[1], 16)))
                x3[row, 2 * p + h] = T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add",
                                                             T.Cast("int32x16", qh))

    return quantize


def _body(update: Any, half: int, groups: int, act: Any, scaled: bool, tile: int, chunk: int) -> Any:
    """The macro body(xq, xd, x3, qw, params, oq, od, o3, batch); `update(acc, qw, params, block, g, xq, xd,
    x3, row)` is one group's accumulation of a 16-row block."""
    tiles = chunk // tile
    quantize = _quantize_group(scaled)

    @T.macro
    def body(xq, xd, x3, qw, params, oq, od, o3, batch):
        for mc in range((batch + chunk - 1) // chunk):
            for p in T.parallel(half // 2):  # the pair of gate blocks 2p, 2p + 1: activation group p
                acc = T.alloc_buffer((2 * tile, LANES), "float32", scope="global")
                vals = T.alloc_buffer((tile, GROUP), "float32", scope="global")
                for bt in range(tiles):
                    if mc * chunk + bt * tile < batch:
                        for c in T.unroll(2):
                            for part in T.unroll(2):  # the gate block, then its up block
                                for i in T.unroll(tile):
                                    acc[part * tile + i, _lanes()] = T.Broadcast(T.float32(0), LANES)
                                for g in range(groups):
                                    for i in T.unroll(tile):
                                        row = T.meta_var(T.min(mc * chunk + bt * tile + i, batch - 1))
                                        acc[part * tile + i, _lanes()] = update(
                                            acc[part * tile + i, _lanes()], qw, params,
                                            2 * p + c + part * half, g, xq, xd, x3, row)
                            for i in T.unroll(tile):
                                vals[i, T.Ramp(c * LANES, 1, LANES)] = (act(acc[i, _lanes()])
                                                                        * acc[tile + i, _lanes()])
                        for i in T.unroll(tile):
                            row = T.meta_var(T.min(mc * chunk + bt * tile + i, batch - 1))
                            quantize(vals, i, oq, od, o3, row, p)

    return body


def _entry(body: Any, qshape: tuple[int, ...], shapes: list[tuple[tuple[int, ...], str]], k: int, f: int,
           in3: tuple[int, str], out3: tuple[int, str]) -> tirx.PrimFunc:
    """The PrimFunc: xq, xd, x3 (x's activations), qweight, the weight's parameters (1, 2 or 4), then the
    outputs oq, od, o3. `in3` / `out3`: (columns per row, dtype) of x3 and o3."""
    groups, fgroups = k // GROUP, f // GROUP
    (w3, t3), (v3, u3) = in3, out3
    padded = shapes + [((1,), "float16")] * 4
    (s0, d0), (s1, d1), (s2, d2), (s3, d3) = padded[:4]
    count = len(shapes)

    if count == 4:
        @T.prim_func(private=True)
        def gq4(var_xq: T.handle, var_xd: T.handle, var_x3: T.handle, var_qw: T.handle, v0: T.handle,
                v1: T.handle, v2: T.handle, v3_: T.handle, var_oq: T.handle, var_od: T.handle,
                var_o3: T.handle):
            T.func_attr({"tir.noalias": True})
            batch = T.int64()
            xq = T.match_buffer(var_xq, (batch, k // 4), "int32")
            xd = T.match_buffer(var_xd, (batch, groups), "float32")
            x3 = T.match_buffer(var_x3, (batch, w3), t3)
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            p1 = T.match_buffer(v1, s1, d1)
            p2 = T.match_buffer(v2, s2, d2)
            p3 = T.match_buffer(v3_, s3, d3)
            oq = T.match_buffer(var_oq, (batch, f // 4), "int32")
            od = T.match_buffer(var_od, (batch, fgroups), "float32")
            o3 = T.match_buffer(var_o3, (batch, v3), u3)
            body(xq, xd, x3, qw, [p0, p1, p2, p3], oq, od, o3, batch)

        return gq4
    if count == 2:
        @T.prim_func(private=True)
        def gq2(var_xq: T.handle, var_xd: T.handle, var_x3: T.handle, var_qw: T.handle, v0: T.handle,
                v1: T.handle, var_oq: T.handle, var_od: T.handle, var_o3: T.handle):
            T.func_attr({"tir.noalias": True})
            batch = T.int64()
            xq = T.match_buffer(var_xq, (batch, k // 4), "int32")
            xd = T.match_buffer(var_xd, (batch, groups), "float32")
            x3 = T.match_buffer(var_x3, (batch, w3), t3)
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            p1 = T.match_buffer(v1, s1, d1)
            oq = T.match_buffer(var_oq, (batch, f // 4), "int32")
            od = T.match_buffer(var_od, (batch, fgroups), "float32")
            o3 = T.match_buffer(var_o3, (batch, v3), u3)
            body(xq, xd, x3, qw, [p0, p1], oq, od, o3, batch)

        return gq2
    if count == 1:
        @T.prim_func(private=True)
        def gq1(var_xq: T.handle, var_xd: T.handle, var_x3: T.handle, var_qw: T.handle, v0: T.handle,
                var_oq: T.handle, var_od: T.handle, var_o3: T.handle):
            T.func_attr({"tir.noalias": True})
            batch = T.int64()
            xq = T.match_buffer(var_xq, (batch, k // 4), "int32")
            xd = T.match_buffer(var_xd, (batch, groups), "float32")
            x3 = T.match_buffer(var_x3, (batch, w3), t3)
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            oq = T.match_buffer(var_oq, (batch, f // 4), "int32")
            od = T.match_buffer(var_od, (batch, fgroups), "float32")
            o3 = T.match_buffer(var_o3, (batch, v3), u3)
            body(xq, xd, x3, qw, [p0], oq, od, o3, batch)

        return gq1
    raise ValueError(f"no gated entry for {count} parameters")


def _out3(f: int, out: str) -> tuple[int, str]:
    if out not in OUT_FORMATS:
        raise ValueError(f"unknown activation format {out!r}: expected one of {', '.join(OUT_FORMATS)}")
    return (f // 16, "int32") if out == "sums" else (f // GROUP, "float32")


def _check(n: int, tile: int, chunk: int) -> int:
    half = gated_blocks(n)
    if half % 2:
        raise ValueError(f"a quantizing gated GEMM needs F a multiple of {GROUP} (gate_up rows {n})")
    if chunk % tile:
        raise ValueError(f"chunk {chunk} must be a multiple of tile {tile}")
    return half


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def qgemm_gated_quant_func(kind: str, n: int, k: int, isa: str, activation: str, out: str,
                           tile: int = TILE, chunk: int = CHUNK) -> tirx.PrimFunc:
    """A generic block type's gate_up [n, K]: xq, xd, xs (qmatmul.quantize_act_sums_func), qweight, params…
    -> the down kernel's activations of act(gate) · up in format `out` (`OUT_FORMATS`)."""
    check_shape(kind, n, k)
    half, act = _check(n, tile, chunk), _activation(activation)

    def update(acc: Any, qw: Any, params: Any, block: Any, g: Any, xq: Any, xd: Any, xs: Any,
               row: Any) -> Any:
        return group_update(kind, isa, acc, qw, params, block, g, xq, xd, xs, row)

    body = _body(update, half, k // GROUP, act, out == "scaled", tile, chunk)
    shapes = [(shape, dtype) for _, shape, dtype in param_shapes(kind, n, k)]
    return _entry(body, qweight_shape(kind, n, k), shapes, k, n // 2, (k // 16, "int32"), _out3(n // 2, out))


@functools.cache
def gemm_gated_quant_func(kind: str, n: int, k: int, vnni: bool, activation: str, out: str,
                          tile: int = TILE, chunk: int = CHUNK) -> tirx.PrimFunc:
    """A tuned Q4_1 / Q8_0 gate_up [n, K] (quant.py's layout): xq, xd, xds (gemv_q4.quantize_act_func),
    qweight, scale, [min] -> the down kernel's activations of act(gate) · up in format `out`."""
    check_tuned_shape(n, k, kind)
    half, act = _check(n, tile, chunk), _activation(activation)

    def update(acc: Any, qw: Any, params: Any, block: Any, g: Any, xq: Any, xd: Any, xds: Any,
               row: Any) -> Any:
        scale, wmin = params[0], params[-1]  # q8_0 ignores the min
        return group_finish(kind, acc, group_dot(kind, vnni, qw, block, g, xq, row, CHAINS),
                            row_vec(scale, block, g), row_vec(wmin, block, g), xd[row, g], xds[row, g])

    body = _body(update, half, k // GROUP, act, out == "scaled", tile, chunk)
    blocks, groups = n // ROWS, k // GROUP
    shapes = [((blocks, groups, LANES), "float16")] * (2 if kind == "q4_1" else 1)
    qshape = (blocks, groups, 4 if kind == "q4_1" else 8, LANES)
    return _entry(body, qshape, shapes, k, n // 2, (groups, "float32"), _out3(n // 2, out))
