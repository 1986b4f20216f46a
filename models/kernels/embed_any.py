"""Embedding lookup for every block type of blocks.py: gather a token's row and dequantize it (exact:
equals gguf's dequantize, see reference_blocks.reference_embedding)."""

from __future__ import annotations

import functools
from typing import Any

from shoal.models.kernels.blocks import GROUP, ROWS, block_kind, check_shape
from shoal.models.kernels.fmatmul import widen_scalar
from shoal.models.kernels.qmatmul import param_shapes, qweight_shape
from tvm import tirx
from tvm.script import tirx as T


def _u32(v: Any) -> tirx.PrimExpr:
    return tirx.Cast("uint32", v)


def element(kind: str, qw: tirx.Buffer, params: list[tirx.Buffer], nb: Any, r: Any, g: Any, s: Any,
            j: Any) -> tirx.PrimExpr:
    """fp32 value of input 4s + j of group g, row r of row block nb."""
    spec = block_kind(kind)
    p = dict(zip(spec.params, params, strict=True))
    if spec.bits == 8:
        code = tirx.bitwise_and(tirx.shift_right(qw[nb, g, s, r], _u32(8 * j)), tirx.const(255, "uint32"))
    else:
        shift = _u32(8 * j + 4 * (s // 4))
        code = tirx.bitwise_and(tirx.shift_right(qw[nb, g, s % 4, r], shift), tirx.const(15, "uint32"))
        if spec.bits == 5:
            high = tirx.bitwise_and(tirx.shift_right(qw[nb, g, 4, r], _u32(8 * j + s)),
                                    tirx.const(1, "uint32"))
            code = tirx.bitwise_or(code, tirx.shift_left(high, tirx.const(4, "uint32")))
        elif spec.bits == 6:
            high = tirx.bitwise_and(tirx.shift_right(qw[nb, g, 4 + s // 4, r], _u32(8 * j + 2 * (s % 4))),
                                    tirx.const(3, "uint32"))
            code = tirx.bitwise_or(code, tirx.shift_left(high, tirx.const(4, "uint32")))
    f32 = functools.partial(tirx.Cast, "float32")
    if kind == "q6_k":
        scale = f32(p["d"][nb, g // 8, r]) * f32(p["sc"][nb, g, s // 4, r])
    elif spec.k_quant:
        scale = f32(p["d"][nb, g // 8, r]) * f32(p["sc"][nb, g, r])
    else:
        scale = f32(p["d"][nb, g, r])
    if not spec.affine:
        return scale * f32(tirx.Cast("int32", code) - spec.offset)
    neg_m = f32(p["m"][nb, g, r]) if "m" in p else -(f32(p["dmin"][nb, g // 8, r]) * f32(p["mn"][nb, g, r]))
    return scale * f32(code) + neg_m


@functools.cache  # TVMScript parsing costs ~0.1 s
def embed_func(kind: str, vocab: int, dim: int) -> tirx.PrimFunc:
    """ids int32 [M], the kind's packed arrays (qweight, params… | weight) -> fp32 [M, dim]."""
    check_shape(kind, vocab, dim)
    spec = block_kind(kind)
    groups = dim // GROUP
    if spec.is_float:
        @T.prim_func(private=True)
        def embed_float(var_ids: T.handle, var_w: T.handle, var_out: T.handle):
            T.func_attr({"tir.noalias": True})
            count = T.int64()
            ids = T.match_buffer(var_ids, (count,), "int32")
            w = T.match_buffer(var_w, (vocab // ROWS, dim, ROWS), "uint16")
            out = T.match_buffer(var_out, (count, dim), "float32")
            for m in T.parallel(count):
                for i in range(dim):
                    out[m, i] = widen_scalar(kind, w[ids[m] // ROWS, i, ids[m] % ROWS])

        return embed_float
    qshape = qweight_shape(kind, vocab, dim)
    padded = [(sh, dt) for _, sh, dt in param_shapes(kind, vocab, dim)] + [((1,), "float16")] * 4
    (s0, d0), (s1, d1), (s2, d2), (s3, d3) = padded[:4]
    count_params = len(spec.params)

    @T.macro
    def body(ids, qw, params, out, count):
        for m in T.parallel(count):
            for g, s, j in T.grid(groups, 8, 4):
                out[m, g * GROUP + s * 4 + j] = element(kind, qw, params, ids[m] // ROWS, ids[m] % ROWS,
                                                        g, s, j)

    if count_params == 1:
        @T.prim_func(private=True)
        def embed1(var_ids: T.handle, var_qw: T.handle, v0: T.handle, var_out: T.handle):
            T.func_attr({"tir.noalias": True})
            count = T.int64()
            ids = T.match_buffer(var_ids, (count,), "int32")
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            out = T.match_buffer(var_out, (count, dim), "float32")
            body(ids, qw, [p0], out, count)

        return embed1
    if count_params == 2:
        @T.prim_func(private=True)
        def embed2(var_ids: T.handle, var_qw: T.handle, v0: T.handle, v1: T.handle, var_out: T.handle):
            T.func_attr({"tir.noalias": True})
            count = T.int64()
            ids = T.match_buffer(var_ids, (count,), "int32")
            qw = T.match_buffer(var_qw, qshape, "uint32")
            p0 = T.match_buffer(v0, s0, d0)
            p1 = T.match_buffer(v1, s1, d1)
            out = T.match_buffer(var_out, (count, dim), "float32")
            body(ids, qw, [p0, p1], out, count)

        return embed2

    @T.prim_func(private=True)
    def embed4(var_ids: T.handle, var_qw: T.handle, v0: T.handle, v1: T.handle, v2: T.handle, v3: T.handle,
               var_out: T.handle):
        T.func_attr({"tir.noalias": True})
        count = T.int64()
        ids = T.match_buffer(var_ids, (count,), "int32")
        qw = T.match_buffer(var_qw, qshape, "uint32")
        p0 = T.match_buffer(v0, s0, d0)
        p1 = T.match_buffer(v1, s1, d1)
        p2 = T.match_buffer(v2, s2, d2)
        p3 = T.match_buffer(v3, s3, d3)
        out = T.match_buffer(var_out, (count, dim), "float32")
        body(ids, qw, [p0, p1, p2, p3], out, count)

    return embed4
