"""Generic quantized matmuls y[B, N] = x[B, K] · Wᵀ for the integer block types of models/kernels/blocks.py
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), dequantizing inside the kernel: integer codes × int8
activations (dot products in qdot.py: VNNI, AVX2 or portable), scales applied per group in fp32.

Activations are quantized per group of 32 as for the Q4_1 kernels (gemv_q4: xd = max|x|/127, xq =
round-half-even(x/xd)), plus the integer sums of xq per half group (xs, int32 [B, 2G]). Per row block, row
b and group g, in order g = 0, 1, … (`fma` = one rounding, explicit `llvm.fma`):
- symmetric (q4_0, q5_0, q8_0): D = dot(code, xq) − o·(xs_lo + xs_hi) (exact int);
  acc = fma(float(D), s·xd, acc)
- q6_k: per half h: D_h = dot_h − 32·xs_h; acc = fma(float(D_lo), s_lo·xd, acc), then the same for hi
- affine (q4_1, q5_1, q4_k, q5_k): acc = fma(float(dot), s·xd, acc);
  acc = fma(−m, xd·float(xs_lo + xs_hi), acc)
where s (and m) come from blocks.py's parameters (s = d·sc exact in fp32) and every `·` is one fp32 rounding.
`models/kernels/reference_blocks.py` is the NumPy twin, bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any

from shoal.models.kernels.blocks import GROUP, ROWS, block_kind, check_shape
from shoal.models.kernels.qdot import centred_dots, half_dots
from shoal.models.kernels.tir_common import LANES, bcast
from tvm import tirx
from tvm.script import tirx as T

TILE = 4
CHUNK = 32


def fma(a: tirx.PrimExpr, b: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
    """a·b + c rounded once (float32x16)."""
    return tirx.call_llvm_pure_intrin("float32x16", "llvm.fma", a, b, c)


def param_shapes(kind: str, n: int, k: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of the parameters after qweight, as blocks.pack_decoded lays them out."""
    spec = block_kind(kind)
    nb, g, s = n // ROWS, k // GROUP, k // 256
    table = {
        "d": ((nb, s, LANES) if spec.k_quant else (nb, g, LANES), "float16"),
        "m": ((nb, g, LANES), "float16"),
        "dmin": ((nb, s, LANES), "float16"),
        "sc": ((nb, g, 2, LANES), "int8") if kind == "q6_k" else ((nb, g, LANES), "uint8"),
        "mn": ((nb, g, LANES), "uint8"),
    }
    return [(name, *table[name]) for name in spec.params]


def qweight_shape(kind: str, n: int, k: int) -> tuple[int, ...]:
    return (n // ROWS, k // GROUP, block_kind(kind).words, LANES)



def _f32(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Cast("float32x16", v)


def group_update(kind: str, isa: str, acc: tirx.PrimExpr, qw: tirx.Buffer, params: list[tirx.Buffer],
                 nb: Any, g: Any, xq: tirx.Buffer, xd: tirx.Buffer, xs: tirx.Buffer, b: Any) -> tirx.PrimExpr:
    """float32x16 accumulator after group g (formulas in the module docstring)."""
    spec = block_kind(kind)
    lo, hi = half_dots(spec.bits, isa, qw, nb, g, xq, b)
    p = dict(zip(spec.params, params, strict=True))
    lanes = tirx.Ramp(0, 1, LANES)
    xdv = bcast(xd[b, g])
    if kind == "q6_k":
        d = _f32(p["d"][nb, g // 8, lanes])
        out = acc
        for h, dot in enumerate((lo, hi)):
            s = d * _f32(p["sc"][nb, g, h, lanes])
            delta = dot - bcast(xs[b, 2 * g + h] * tirx.const(32, "int32"))
            out = fma(_f32(delta), s * xdv, out)
        return out
    if not spec.affine:
        s = _f32(p["d"][nb, g, lanes])
        total = xs[b, 2 * g] + xs[b, 2 * g + 1]
        delta = lo + hi
        if not centred_dots(spec.bits, isa):
            delta = delta - bcast(total * tirx.const(spec.offset, "int32"))
        return fma(_f32(delta), s * xdv, acc)
    if "m" in p:  # q4_1, q5_1
        s, neg_m = _f32(p["d"][nb, g, lanes]), _f32(p["m"][nb, g, lanes])
    else:
        s = _f32(p["d"][nb, g // 8, lanes]) * _f32(p["sc"][nb, g, lanes])
        neg_m = -(_f32(p["dmin"][nb, g // 8, lanes]) * _f32(p["mn"][nb, g, lanes]))
    xds = xd[b, g] * tirx.Cast("float32", xs[b, 2 * g] + xs[b, 2 * g + 1])
    return fma(neg_m, bcast(xds), fma(_f32(lo + hi), s * xdv, acc))


# ---------------------------------------------------------------- activation quantization

def _quantize_row(groups: int):
    """TVMScript macro: row b of x -> xq (packed int8), xd, xs (half sums), as gemv_q4's quantize_act."""

    @T.macro
    def row(x, xq, xd, xs, b):
        sc = T.alloc_buffer((2,), "float32", scope="global")  # d, 1/d
        for g in range(groups):
            xv = T.meta_var(x[b, T.Ramp(g * GROUP, 1, GROUP)])
            amax = T.meta_var(T.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fmax", T.fabs(xv)))
            sc[0] = amax / T.float32(127)
            sc[1] = T.Select(sc[0] > T.float32(0), T.float32(1) / sc[0], T.float32(0))
            q = T.meta_var(T.round(xv * T.Broadcast(sc[1], GROUP)))
            xq[b, T.Ramp(g * 8, 1, 8)] = T.reinterpret("int32x8", T.Cast("int8x32", q))
            xd[b, g] = sc[0]
            for h in range(2):
                qh = T.meta_var(T.round(x[b, T.Ramp(g * GROUP + h * 16, 1, 16)] * T.Broadcast(sc[1], 16)))
                xs[b, 2 * g + h] = T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add",
                                                           T.Cast("int32x16", qh))

    return row


@functools.cache
def quantize_act_sums_func(k: int) -> tirx.PrimFunc:
    """x fp32 [B, K] -> xq int32 [B, K/4], xd fp32 [B, K/32], xs int32 [B, K/16] (parallel over rows)."""
    if k % GROUP:
        raise ValueError(f"activation width {k} is not a multiple of {GROUP}")
    groups = k // GROUP
    row = _quantize_row(groups)

    @T.prim_func(private=True)
    def quantize_act_sums(var_x: T.handle, var_xq: T.handle, var_xd: T.handle, var_xs: T.handle):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        x = T.match_buffer(var_x, (batch, k), "float32")
        xq = T.match_buffer(var_xq, (batch, k // 4), "int32")
        xd = T.match_buffer(var_xd, (batch, groups), "float32")
        xs = T.match_buffer(var_xs, (batch, 2 * groups), "int32")
        for b in T.parallel(batch):
            row(x, xq, xd, xs, b)

    return quantize_act_sums


# ---------------------------------------------------------------- GEMV (fused quantization) and GEMM

def block_entry(kind: str, n: int, k: int, fused: bool, body: Any, out: int | None = None) -> tirx.PrimFunc:
    """The PrimFunc around `body(xq, xd, xs, qw, params, y, batch)`: arguments (x | xq, xd, xs), qweight,
    the kind's parameters, y fp32 [B, `out`] (default n; n / 2 for the gated kernels)."""
    out = n if out is None else out
    groups = k // GROUP
    qshape = qweight_shape(kind, n, k)
    shapes = param_shapes(kind, n, k)
    row = _quantize_row(groups)
    padded = [(sh, dt) for _, sh, dt in shapes] + [((1,), "float16")] * 4
    (s0, d0), (s1, d1), (s2, d2), (s3, d3) = padded[:4]
    count = len(shapes)

    @T.macro
    def prologue(x, xq, xd, xs, batch):
        for b in range(batch):
            row(x, xq, xd, xs, b)

    if fused and count == 4:
        @T.prim_func(private=True)
        def gemv4(var_x: T.handle, var_qw: T.handle, v0: T.handle, v1: T.handle, v2: T.handle,
                  v3: T.handle, var_y: T.handle):
            T.func_attr({"tir.noalias": True})
            batch = T.int64()
            x = T.match_buffer(var_x, (batch, k), "float32")
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            p1 = T.match_buffer(v1, s1, d1)
            p2 = T.match_buffer(v2, s2, d2)
            p3 = T.match_buffer(v3, s3, d3)
            y = T.match_buffer(var_y, (batch, out), "float32")
            xq = T.alloc_buffer((batch, k // 4), "int32", scope="global")
            xd = T.alloc_buffer((batch, groups), "float32", scope="global")
            xs = T.alloc_buffer((batch, 2 * groups), "int32", scope="global")
            prologue(x, xq, xd, xs, batch)
            body(xq, xd, xs, qw, [p0, p1, p2, p3], y, batch)

        return gemv4
    if fused and count == 2:
        @T.prim_func(private=True)
        def gemv2(var_x: T.handle, var_qw: T.handle, v0: T.handle, v1: T.handle, var_y: T.handle):
            T.func_attr({"tir.noalias": True})
            batch = T.int64()
            x = T.match_buffer(var_x, (batch, k), "float32")
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            p1 = T.match_buffer(v1, s1, d1)
            y = T.match_buffer(var_y, (batch, out), "float32")
            xq = T.alloc_buffer((batch, k // 4), "int32", scope="global")
            xd = T.alloc_buffer((batch, groups), "float32", scope="global")
            xs = T.alloc_buffer((batch, 2 * groups), "int32", scope="global")
            prologue(x, xq, xd, xs, batch)
            body(xq, xd, xs, qw, [p0, p1], y, batch)

        return gemv2
    if fused:
        @T.prim_func(private=True)
        def gemv1(var_x: T.handle, var_qw: T.handle, v0: T.handle, var_y: T.handle):
            T.func_attr({"tir.noalias": True})
            batch = T.int64()
            x = T.match_buffer(var_x, (batch, k), "float32")
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            y = T.match_buffer(var_y, (batch, out), "float32")
            xq = T.alloc_buffer((batch, k // 4), "int32", scope="global")
            xd = T.alloc_buffer((batch, groups), "float32", scope="global")
            xs = T.alloc_buffer((batch, 2 * groups), "int32", scope="global")
            prologue(x, xq, xd, xs, batch)
            body(xq, xd, xs, qw, [p0], y, batch)

        return gemv1
    if count == 4:
        @T.prim_func(private=True)
        def mm4(var_xq: T.handle, var_xd: T.handle, var_xs: T.handle, var_qw: T.handle, v0: T.handle,
                v1: T.handle, v2: T.handle, v3: T.handle, var_y: T.handle):
            T.func_attr({"tir.noalias": True})
            batch = T.int64()
            xq = T.match_buffer(var_xq, (batch, k // 4), "int32")
            xd = T.match_buffer(var_xd, (batch, groups), "float32")
            xs = T.match_buffer(var_xs, (batch, 2 * groups), "int32")
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            p1 = T.match_buffer(v1, s1, d1)
            p2 = T.match_buffer(v2, s2, d2)
            p3 = T.match_buffer(v3, s3, d3)
            y = T.match_buffer(var_y, (batch, out), "float32")
            body(xq, xd, xs, qw, [p0, p1, p2, p3], y, batch)

        return mm4
    if count == 2:
        @T.prim_func(private=True)
        def mm2(var_xq: T.handle, var_xd: T.handle, var_xs: T.handle, var_qw: T.handle, v0: T.handle,
                v1: T.handle, var_y: T.handle):
            T.func_attr({"tir.noalias": True})
            batch = T.int64()
            xq = T.match_buffer(var_xq, (batch, k // 4), "int32")
            xd = T.match_buffer(var_xd, (batch, groups), "float32")
            xs = T.match_buffer(var_xs, (batch, 2 * groups), "int32")
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            p1 = T.match_buffer(v1, s1, d1)
            y = T.match_buffer(var_y, (batch, out), "float32")
            body(xq, xd, xs, qw, [p0, p1], y, batch)

        return mm2
    if count == 1:
        @T.prim_func(private=True)
        def mm1(var_xq: T.handle, var_xd: T.handle, var_xs: T.handle, var_qw: T.handle, v0: T.handle,
                var_y: T.handle):
            T.func_attr({"tir.noalias": True})
            batch = T.int64()
            xq = T.match_buffer(var_xq, (batch, k // 4), "int32")
            xd = T.match_buffer(var_xd, (batch, groups), "float32")
            xs = T.match_buffer(var_xs, (batch, 2 * groups), "int32")
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            y = T.match_buffer(var_y, (batch, out), "float32")
            body(xq, xd, xs, qw, [p0], y, batch)

        return mm1
    raise ValueError(f"no matmul entry for {count} parameters")


PREFETCH_BYTES = 2048
"""How far ahead of the group being multiplied the GEMV prefetches its weight stream (software prefetch into
L1). One thread on znver3 streamed 11-13 GB/s without it and 15-18 GB/s with it (bench/kernels.py --kinds);
2-8 KiB measured alike."""


def prefetch_ahead(kind: str, n: int, k: int, follow: Any = None) -> Any:
    """TVMScript macro: software prefetch of group g + ahead's code words and per-group parameters in the
    row block's stream (past the block's last group the flat address runs on into the next block, as the
    threads' streams do; a prefetch never faults). `follow(nb, g_ahead, groups)` -> (block, group) where a
    thread's stream goes on elsewhere (gated_matmul: a gate block, then its up block)."""
    words = block_kind(kind).words
    ahead = max(1, PREFETCH_BYTES // (words * LANES * 4))
    per_group = [i for i, (_, shape, _) in enumerate(param_shapes(kind, n, k)) if shape[1] == k // GROUP]

    def line(buf: tirx.Buffer, nb: Any, g: Any, t: int = 0) -> tirx.PrimExpr:
        block, group = (nb, g + ahead) if follow is None else follow(nb, g + ahead, k // GROUP)
        index = [block, group, t, 0] if len(buf.shape) == 4 else [block, group, 0]
        return tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(tirx.BufferLoad(buf, index)),
                                0, 3, 1)

    if not PREFETCH_BYTES:
        @T.macro
        def nothing(qw, params, nb, g):
            T.evaluate(0)

        return nothing

    @T.macro
    def prefetch(qw, params, nb, g):
        for t in T.unroll(words):
            T.evaluate(line(qw, nb, g, t))
        T.evaluate(line(params[per_group[0]], nb, g))
        if len(per_group) > 1:
            T.evaluate(line(params[per_group[-1]], nb, g))

    return prefetch


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def qgemv_func(kind: str, n: int, k: int, isa: str) -> tirx.PrimFunc:
    """Decode: x fp32 [B, K] (quantized inside, single-threaded), qweight, params… -> y fp32 [B, N]; the row
    blocks are split over the threads."""
    check_shape(kind, n, k)
    blocks, groups = n // ROWS, k // GROUP
    prefetch = prefetch_ahead(kind, n, k)

    @T.macro
    def body(xq, xd, xs, qw, params, y, batch):
        for nb in T.parallel(blocks):
            acc = T.alloc_buffer((LANES,), "float32", scope="global")
            for b in range(batch):
                acc[T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for g in range(groups):
                    prefetch(qw, params, nb, g)
                    acc[T.Ramp(0, 1, LANES)] = group_update(kind, isa, acc[T.Ramp(0, 1, LANES)], qw, params,
                                                            nb, g, xq, xd, xs, b)
                y[b, T.Ramp(nb * ROWS, 1, LANES)] = acc[T.Ramp(0, 1, LANES)]

    return block_entry(kind, n, k, True, body)


@functools.cache
def qgemm_func(kind: str, n: int, k: int, isa: str, tile: int = TILE, chunk: int = CHUNK) -> tirx.PrimFunc:
    """Prefill: xq, xd, xs (from `quantize_act_sums_func`), qweight, params… -> y fp32 [M, N]. Rows in chunks
    of `chunk`, tiles of `tile` rows share each 16-row weight block (as gemm_q4)."""
    check_shape(kind, n, k)
    if chunk % tile:
        raise ValueError(f"chunk {chunk} must be a multiple of tile {tile}")
    blocks, groups, tiles = n // ROWS, k // GROUP, chunk // tile

    @T.macro
    def body(xq, xd, xs, qw, params, y, batch):
        for mc in range((batch + chunk - 1) // chunk):
            for nb in T.parallel(blocks):
                acc = T.alloc_buffer((tile, LANES), "float32", scope="global")
                for bt in range(tiles):
                    if mc * chunk + bt * tile < batch:
                        for i in T.unroll(tile):
                            acc[i, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                        for g in range(groups):
                            for i in T.unroll(tile):
                                row = T.meta_var(T.min(mc * chunk + bt * tile + i, batch - 1))
                                acc[i, T.Ramp(0, 1, LANES)] = group_update(
                                    kind, isa, acc[i, T.Ramp(0, 1, LANES)], qw, params, nb, g, xq, xd, xs,
                                    row)
                        for i in T.unroll(tile):
                            row = T.meta_var(T.min(mc * chunk + bt * tile + i, batch - 1))
                            y[row, T.Ramp(nb * ROWS, 1, LANES)] = acc[i, T.Ramp(0, 1, LANES)]

    return block_entry(kind, n, k, False, body)
