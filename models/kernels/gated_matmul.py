"""The gate_up projection fused with its gated activation: y [B, F] = act(x·W_gateᵀ) · (x·W_upᵀ) for a gate_up
weight W [2F, K] holding the gate rows then the up rows (models/llama.py's fused projection), in one kernel
call, without the [B, 2F] fp32 projection output (16 MiB a 256-token prefill chunk of Llama-3.2-1B: over a
third of the chunk's workspace) and, in decode, with one kernel call less per layer.

Each thread takes a 16-row block nb of the gate rows and the matching block nb + F/16 of the up rows. Per
tile of activation rows it accumulates the gate block, keeps the tile's gate sums, then accumulates the up
block — each exactly as the plain kernel does (same group order, same roundings: qmatmul.group_update for
the generic block types, tir_common.group_dot/group_finish for the tuned Q4_1/Q8_0 ones) — and writes
act(gate) · up with norm_act_cpu's activation expressions (`ACTIVATIONS`). The result is bit for bit the
plain matmul followed by `silu_mul` / `gelu_mul` (tests/models/test_gated_matmul.py).

- `qgemv_gated_func` / `qgemm_gated_func`: every integer block type of blocks.py (qmatmul's arguments).
- `gemv_gated_func` / `gemm_gated_func`: Q4_1 / Q8_0 in quant.py's layout (gemv_q4 / gemm_q4 arguments).
The F16/BF16 matmul and a gate_up whose gate and up differ in block type (relax_blocks.MixedLinear) keep
the plain matmul and the separate activation kernel (relax_blocks.gated_projection).
"""

from __future__ import annotations

import functools
from typing import Any

from shoal.models.kernels.blocks import GROUP as BLOCK_GROUP
from shoal.models.kernels.blocks import ROWS, check_shape
from shoal.models.kernels.gemv_q4 import check_shape as check_tuned_shape
from shoal.models.kernels.gemv_q4 import fused_entry, matmul_entry
from shoal.models.kernels.norm_act_cpu import ACTIVATIONS
from shoal.models.kernels.qmatmul import CHUNK, TILE, block_entry, group_update, prefetch_ahead
from shoal.models.kernels.quant import GROUP
from shoal.models.kernels.tir_common import LANES, group_dot, group_finish, row_vec
from tvm import tirx
from tvm.script import tirx as T


def gated_blocks(n: int) -> int:
    """The gate's 16-row blocks of a gate_up matrix of n rows; ValueError unless n = 2F, F % 16 == 0."""
    if n % (2 * ROWS):
        raise ValueError(f"a gated matmul needs gate_up rows 2F with F a multiple of {ROWS}, got {n}")
    return n // ROWS // 2


def _activation(name: str) -> Any:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _lanes() -> tirx.PrimExpr:
    return tirx.Ramp(0, 1, LANES)


# ---------------------------------------------------------------- generic block types (qmatmul.py)

@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def qgemv_gated_func(kind: str, n: int, k: int, isa: str, activation: str) -> tirx.PrimFunc:
    """Decode: x fp32 [B, K] (quantized inside), qweight, params… of the gate_up matrix [n, K] -> y fp32
    [B, n/2] = act(gate) · up; the gate's row blocks (each with its up block) are split over the threads."""
    check_shape(kind, n, k)
    half, groups, act = gated_blocks(n), k // BLOCK_GROUP, _activation(activation)

    def follow(block: Any, g: Any, count: int) -> tuple[Any, Any]:
        """Past a block's last group the thread's stream goes on in gate block b's up block b + F/16, past
        that in gate block b + 1 (the next iteration of its contiguous range)."""
        over = g >= count
        nxt = tirx.Select(block < half, block + half, block - half + 1)
        return tirx.Select(over, nxt, block), tirx.Select(over, g - count, g)

    prefetch = prefetch_ahead(kind, n, k, follow)

    @T.macro
    def body(xq, xd, xs, qw, params, y, batch):
        for nb in T.parallel(half):
            acc = T.alloc_buffer((2, LANES), "float32", scope="global")
            for b in range(batch):
                for part in T.unroll(2):  # the gate block, then the up block
                    acc[part, _lanes()] = T.Broadcast(T.float32(0), LANES)
                    for g in range(groups):
                        prefetch(qw, params, nb + part * half, g)
                        acc[part, _lanes()] = group_update(kind, isa, acc[part, _lanes()], qw, params,
                                                           nb + part * half, g, xq, xd, xs, b)
                y[b, T.Ramp(nb * ROWS, 1, LANES)] = act(acc[0, _lanes()]) * acc[1, _lanes()]

    return block_entry(kind, n, k, True, body, out=n // 2)


@functools.cache
def qgemm_gated_func(kind: str, n: int, k: int, isa: str, activation: str, tile: int = TILE,
                     chunk: int = CHUNK) -> tirx.PrimFunc:
    """Prefill: xq, xd, xs (qmatmul.quantize_act_sums_func), qweight, params… of the gate_up matrix [n, K]
    -> y fp32 [M, n/2] = act(gate) · up. Rows in chunks of `chunk`, tiles of `tile` rows (as qgemm_func)."""
    check_shape(kind, n, k)
    if chunk % tile:
        raise ValueError(f"chunk {chunk} must be a multiple of tile {tile}")
    half, groups, tiles, act = gated_blocks(n), k // BLOCK_GROUP, chunk // tile, _activation(activation)

    @T.macro
    def body(xq, xd, xs, qw, params, y, batch):
        for mc in range((batch + chunk - 1) // chunk):
            for nb in T.parallel(half):
                acc = T.alloc_buffer((2 * tile, LANES), "float32", scope="global")
                for bt in range(tiles):
                    if mc * chunk + bt * tile < batch:
                        for part in T.unroll(2):  # the gate block's tile sums, then the up block's
                            for i in T.unroll(tile):
                                acc[part * tile + i, _lanes()] = T.Broadcast(T.float32(0), LANES)
                            for g in range(groups):
                                for i in T.unroll(tile):
                                    row = T.meta_var(T.min(mc * chunk + bt * tile + i, batch - 1))
                                    acc[part * tile + i, _lanes()] = group_update(
                                        kind, isa, acc[part * tile + i, _lanes()], qw, params,
                                        nb + part * half, g, xq, xd, xs, row)
                        for i in T.unroll(tile):
                            row = T.meta_var(T.min(mc * chunk + bt * tile + i, batch - 1))
                            y[row, T.Ramp(nb * ROWS, 1, LANES)] = act(acc[i, _lanes()]) * acc[tile + i,
                                                                                               _lanes()]

    return block_entry(kind, n, k, False, body, out=n // 2)


# ---------------------------------------------------------------- Q4_1 / Q8_0 in the tuned layout (gemv_q4, g

@functools.cache
def gemv_gated_func(kind: str, n: int, k: int, vnni: bool, activation: str) -> tirx.PrimFunc:
    """Decode: x fp32 [B, K] (quantized inside), qweight, scale, [min (q4_1)] -> y fp32 [B, n/2]."""
    check_tuned_shape(n, k, kind)
    half, groups, act = gated_blocks(n), k // GROUP, _activation(activation)

    @T.macro
    def body(xq, xd, xds, qw, scale, wmin, y, batch):
        for nb in T.parallel(half):
            acc = T.alloc_buffer((2, LANES), "float32", scope="global")
            for b in range(batch):
                for part in T.unroll(2):
                    acc[part, _lanes()] = T.Broadcast(T.float32(0), LANES)
                    for g in range(groups):
                        block = T.meta_var(nb + part * half)
                        acc[part, _lanes()] = group_finish(
                            kind, acc[part, _lanes()], group_dot(kind, vnni, qw, block, g, xq, b),
                            row_vec(scale, block, g), row_vec(wmin, block, g), xd[b, g], xds[b, g])
                y[b, T.Ramp(nb * ROWS, 1, LANES)] = act(acc[0, _lanes()]) * acc[1, _lanes()]

    return fused_entry(body, kind, n, k, out=n // 2)


@functools.cache
def gemm_gated_func(kind: str, n: int, k: int, vnni: bool, activation: str, tile: int = TILE,
                    chunk: int = CHUNK) -> tirx.PrimFunc:
    """Prefill: xq, xd, xds (gemv_q4.quantize_act_func), qweight, scale, [min (q4_1)] -> y fp32 [M, n/2]."""
    from shoal.models.kernels.gemm_q4 import CHAINS

    check_tuned_shape(n, k, kind)
    if chunk % tile:
        raise ValueError(f"chunk {chunk} must be a multiple of tile {tile}")
    half, groups, tiles, act = gated_blocks(n), k // GROUP, chunk // tile, _activation(activation)

    @T.macro
    def body(xq, xd, xds, qw, scale, wmin, y, batch):
        for mc in range((batch + chunk - 1) // chunk):
            for nb in T.parallel(half):
                acc = T.alloc_buffer((2 * tile, LANES), "float32", scope="global")
                for bt in range(tiles):
                    if mc * chunk + bt * tile < batch:
                        for part in T.unroll(2):
                            for i in T.unroll(tile):
                                acc[part * tile + i, _lanes()] = T.Broadcast(T.float32(0), LANES)
                            for g in range(groups):
                                for i in T.unroll(tile):
                                    row = T.meta_var(T.min(mc * chunk + bt * tile + i, batch - 1))
                                    block = T.meta_var(nb + part * half)
                                    dot = T.meta_var(group_dot(kind, vnni, qw, block, g, xq, row, CHAINS))
                                    acc[part * tile + i, _lanes()] = group_finish(
                                        kind, acc[part * tile + i, _lanes()], dot, row_vec(scale, block, g),
                                        row_vec(wmin, block, g), xd[row, g], xds[row, g])
                        for i in T.unroll(tile):
                            row = T.meta_var(T.min(mc * chunk + bt * tile + i, batch - 1))
                            y[row, T.Ramp(nb * ROWS, 1, LANES)] = act(acc[i, _lanes()]) * acc[tile + i,
                                                                                               _lanes()]

    return matmul_entry(body, kind, n, k, out=n // 2)
