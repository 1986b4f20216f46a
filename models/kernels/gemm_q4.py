"""Prefill kernels (many rows of activations): the quantized GEMM y[M, N] = x[M, K] · Wᵀ over Q4_1 / Q8_0
weights in the 16-row interleaved layout, from activations quantized by `gemv_q4.quantize_act_func`.

Rows are processed in chunks of `CHUNK` (their int8 activations stay in L1 beside the weight block); within
a chunk each thread takes whole 16-row weight blocks and runs tiles of `TILE` activation rows against them,
so every unpacked weight vector feeds `TILE` VNNI dot products (LLVM merges the repeated unpacking), and the
rows' accumulation chains interleave (`CHAINS` = 1 per row). M is symbolic (int64).
"""

from __future__ import annotations

import functools

from shoal.models.kernels.gemv_q4 import check_shape, matmul_entry
from shoal.models.kernels.quant import GROUP, ROWS
from shoal.models.kernels.tir_common import LANES, group_dot, group_finish, row_vec
from tvm import tirx
from tvm.script import tirx as T

TILE = 4
CHUNK = 32
CHAINS = 1


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def gemm_func(kind: str, n: int, k: int, vnni: bool, tile: int = TILE, chunk: int = CHUNK,
              chains: int = CHAINS) -> tirx.PrimFunc:
    """y fp32 [M, N]; arguments as `gemv_q4.gemv_func`: xq, xd, xds, qweight, scale, [min (q4_1)], y."""
    check_shape(n, k, kind)
    if chunk % tile:
        raise ValueError(f"chunk {chunk} must be a multiple of tile {tile}")
    blocks, groups = n // ROWS, k // GROUP
    tiles = chunk // tile

    @T.macro
    def body(xq, xd, xds, qw, scale, wmin, y, batch):
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
                                dot = T.meta_var(group_dot(kind, vnni, qw, nb, g, xq, row, chains))
                                acc[i, T.Ramp(0, 1, LANES)] = group_finish(
                                    kind, acc[i, T.Ramp(0, 1, LANES)], dot, row_vec(scale, nb, g),
                                    row_vec(wmin, nb, g), xd[row, g], xds[row, g])
                        for i in T.unroll(tile):
                            row = T.meta_var(T.min(mc * chunk + bt * tile + i, batch - 1))
                            y[row, T.Ramp(nb * ROWS, 1, LANES)] = acc[i, T.Ramp(0, 1, LANES)]

    return matmul_entry(body, kind, n, k)
