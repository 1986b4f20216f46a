"""CUDA variant of the quantized matmul: y[B, N] = x[B, K] · Wᵀ over the same packed Q4_1 / Q8_0 arrays as
the CPU kernels, with fp32 activations (no int8 activation step on the GPU).

One thread block per (16-row weight block, activation row): threadIdx.x = the 16 rows (so each load of a
weight word is one coalesced 64-byte access), threadIdx.y = 16 slices of the groups; the slices meet in
shared memory. A first, simple schedule: correct and memory-friendly, not tuned.
"""

from __future__ import annotations

import functools

from shoal.models.kernels.gemv_q4 import check_shape
from shoal.models.kernels.quant import GROUP, ROWS
from tvm import tirx
from tvm.script import tirx as T

SLICES = 16


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def cuda_matmul_func(kind: str, n: int, k: int) -> tirx.PrimFunc:
    """Arguments: x fp32 [B, K], qweight, scale, [min (q4_1)], y fp32 [B, N]."""
    check_shape(n, k, kind)
    blocks, groups, words = n // ROWS, k // GROUP, 4 if kind == "q4_1" else 8
    steps = (groups + SLICES - 1) // SLICES

    def code(word: tirx.PrimExpr, shift: int, mask: int) -> tirx.PrimExpr:
        return T.Cast("float32", T.bitwise_and(T.shift_right(word, T.uint32(shift)), T.uint32(mask)))

    @T.macro
    def body(x, qw, scale, wmin, y, batch):
        for b in T.thread_binding(batch, thread="blockIdx.y"):
            for nb in T.thread_binding(blocks, thread="blockIdx.x"):
                for s in T.thread_binding(SLICES, thread="threadIdx.y"):
                    for r in T.thread_binding(ROWS, thread="threadIdx.x"):
                        part = T.alloc_buffer((1,), "float32", scope="local")
                        red = T.alloc_buffer((SLICES, ROWS), "float32", scope="shared")
                        part[0] = T.float32(0)
                        for step in range(steps):
                            if step * SLICES + s < groups:
                                g = T.meta_var(step * SLICES + s)
                                d = T.meta_var(T.Cast("float32", scale[nb, g, r]))
                                for t, j in T.grid(words, 4):
                                    if kind == "q4_1":
                                        m = T.meta_var(T.Cast("float32", wmin[nb, g, r]))
                                        part[0] = part[0] + x[b, g * GROUP + t * 4 + j] * (
                                            d * code(qw[nb, g, t, r], 8 * j, 15) + m)
                                        part[0] = part[0] + x[b, g * GROUP + 16 + t * 4 + j] * (
                                            d * code(qw[nb, g, t, r], 8 * j + 4, 15) + m)
                                    else:
                                        part[0] = part[0] + x[b, g * GROUP + t * 4 + j] * (
                                            d * (code(qw[nb, g, t, r], 8 * j, 255) - T.float32(128)))
                        red[s, r] = part[0]
                        T.tvm_storage_sync("shared")
                        if s == 0:
                            for i in range(1, SLICES):
                                part[0] = part[0] + red[i, r]
                            y[b, nb * ROWS + r] = part[0]

    @T.prim_func(private=True)
    def cuda_q4_1(var_x: T.handle, qw: T.Buffer((blocks, groups, words, ROWS), "uint32"),
                  scale: T.Buffer((blocks, groups, ROWS), "float16"),
                  wmin: T.Buffer((blocks, groups, ROWS), "float16"), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        x = T.match_buffer(var_x, (batch, k), "float32")
        y = T.match_buffer(var_y, (batch, n), "float32")
        body(x, qw, scale, wmin, y, batch)

    @T.prim_func(private=True)
    def cuda_q8_0(var_x: T.handle, qw: T.Buffer((blocks, groups, words, ROWS), "uint32"),
                  scale: T.Buffer((blocks, groups, ROWS), "float16"), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        x = T.match_buffer(var_x, (batch, k), "float32")
        y = T.match_buffer(var_y, (batch, n), "float32")
        body(x, qw, scale, scale, y, batch)  # q8_0 ignores the min

    return cuda_q4_1 if kind == "q4_1" else cuda_q8_0


EMBED_THREADS = 128


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def cuda_embedding_func(vocab: int, dim: int) -> tirx.PrimFunc:
    """Q8_0 embedding gather on the GPU: ids int32 [M] -> fp32 [M, D] (one thread block per token)."""
    if vocab % ROWS or dim % GROUP:
        raise ValueError(f"embedding [{vocab}, {dim}]: vocab must be a multiple of {ROWS}, dim of {GROUP}")
    blocks, groups = vocab // ROWS, dim // GROUP
    steps = (dim + EMBED_THREADS - 1) // EMBED_THREADS

    @T.prim_func(private=True)
    def cuda_embed_q8_0(var_ids: T.handle, qw: T.Buffer((blocks, groups, 8, ROWS), "uint32"),
                        scale: T.Buffer((blocks, groups, ROWS), "float16"), var_out: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        count = T.int64()
        ids = T.match_buffer(var_ids, (count,), "int32")
        out = T.match_buffer(var_out, (count, dim), "float32")
        for m in T.thread_binding(count, thread="blockIdx.x"):
            for tx in T.thread_binding(EMBED_THREADS, thread="threadIdx.x"):
                for step in range(steps):
                    if step * EMBED_THREADS + tx < dim:
                        e = T.meta_var(step * EMBED_THREADS + tx)
                        v = T.meta_var(ids[m])
                        word = T.meta_var(qw[v // ROWS, e // GROUP, e % GROUP // 4, v % ROWS])
                        code = T.meta_var(T.Cast("int32", T.bitwise_and(
                            T.shift_right(word, T.Cast("uint32", e % 4 * 8)), T.uint32(255))))
                        out[m, e] = T.Cast("float32", code - 128) * T.Cast(
                            "float32", scale[v // ROWS, e // GROUP, v % ROWS])

    return cuda_embed_q8_0
