"""Embedding lookup from a Q8_0 token table in the 16-row interleaved layout (models/kernels/quant.py)."""

from __future__ import annotations

import functools

from shoal.models.kernels.quant import GROUP, ROWS
from tvm import tirx
from tvm.script import tirx as T


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def embedding_func(vocab: int, dim: int) -> tirx.PrimFunc:
    """ids int32 [M], qweight uint32 [V/16, D/32, 8, 16], scale float16 [V/16, D/32, 16] -> fp32 [M, D]."""
    if vocab % ROWS or dim % GROUP:
        raise ValueError(f"embedding [{vocab}, {dim}]: vocab must be a multiple of {ROWS}, dim of {GROUP}")
    blocks, groups = vocab // ROWS, dim // GROUP

    @T.prim_func(private=True)
    def embed_q8_0(var_ids: T.handle, qw: T.Buffer((blocks, groups, 8, ROWS), "uint32"),
                   scale: T.Buffer((blocks, groups, ROWS), "float16"), var_out: T.handle):
        T.func_attr({"tir.noalias": True})
        count = T.int64()
        ids = T.match_buffer(var_ids, (count,), "int32")
        out = T.match_buffer(var_out, (count, dim), "float32")
        for m in T.parallel(count):
            for g, t, j in T.grid(groups, 8, 4):
                word = T.meta_var(qw[ids[m] // ROWS, g, t, ids[m] % ROWS])
                code = T.meta_var(T.Cast("int32", T.bitwise_and(T.shift_right(word, T.Cast("uint32", 8 * j)),
                                                                T.uint32(255))))
                out[m, g * GROUP + t * 4 + j] = (T.Cast("float32", code - 128)
                                                 * T.Cast("float32", scale[ids[m] // ROWS, g, ids[m] % ROWS]))

    return embed_q8_0
