"""F16 / BF16 weights: y[B, N] = x[B, K] · Wᵀ with W kept 16-bit (blocks.py layout `weight` uint16
[N/16, K, 16]) and widened to fp32 inside the kernel; the embedding rows of the same layout.

Per 16-row block and activation row: four fp32 fma chains, input k feeding chain k mod 4, summed
(c0 + c1) + (c2 + c3) at the end (reference_blocks._float_matmul). Activations stay fp32 (llama.cpp rounds
them to f16 / bf16 first). Row blocks are split over the threads; prefill runs the same loop per row.
"""

from __future__ import annotations

import functools

from shoal.models.kernels.blocks import ROWS, check_shape
from shoal.models.kernels.qmatmul import fma
from shoal.models.kernels.tir_common import LANES
from tvm import tirx
from tvm.script import tirx as T

CHAINS = 4


def widen(kind: str, bits: tirx.PrimExpr, lanes: int = LANES) -> tirx.PrimExpr:
    """uint16 x `lanes` raw values -> float32 x `lanes` (exact)."""
    if kind == "f16":
        return tirx.Cast(f"float32x{lanes}", tirx.reinterpret(f"float16x{lanes}", bits))
    sixteen = tirx.Broadcast(tirx.const(16, "uint32"), lanes)
    wide = tirx.shift_left(tirx.Cast(f"uint32x{lanes}", bits), sixteen)
    return tirx.reinterpret(f"float32x{lanes}", wide)


def widen_scalar(kind: str, bits: tirx.PrimExpr) -> tirx.PrimExpr:
    if kind == "f16":
        return tirx.Cast("float32", tirx.reinterpret("float16", bits))
    return tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("uint32", bits), tirx.const(16, "uint32")))


@functools.cache  # TVMScript parsing costs ~0.1 s; a model asks for each shape many times
def fmatmul_func(kind: str, n: int, k: int) -> tirx.PrimFunc:
    """x fp32 [B, K], weight uint16 [N/16, K, 16] -> y fp32 [B, N] (kind "f16" or "bf16")."""
    check_shape(kind, n, k)
    if kind not in ("f16", "bf16"):
        raise ValueError(f"fmatmul_func is for f16 / bf16, not {kind!r}")
    blocks = n // ROWS

    @T.prim_func(private=True)
    def fmatmul(var_x: T.handle, var_w: T.handle, var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        x = T.match_buffer(var_x, (batch, k), "float32")
        w = T.match_buffer(var_w, (blocks, k, LANES), "uint16")
        y = T.match_buffer(var_y, (batch, n), "float32")
        for nb in T.parallel(blocks):
            acc = T.alloc_buffer((CHAINS, LANES), "float32", scope="global")
            for b in range(batch):
                for c in T.unroll(CHAINS):
                    acc[c, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for kk in range(k // CHAINS):
                    for c in T.unroll(CHAINS):
                        acc[c, T.Ramp(0, 1, LANES)] = fma(
                            T.Broadcast(x[b, kk * CHAINS + c], LANES),
                            widen(kind, w[nb, kk * CHAINS + c, T.Ramp(0, 1, LANES)]),
                            acc[c, T.Ramp(0, 1, LANES)])
                y[b, T.Ramp(nb * ROWS, 1, LANES)] = (
                    (acc[0, T.Ramp(0, 1, LANES)] + acc[1, T.Ramp(0, 1, LANES)])
                    + (acc[2, T.Ramp(0, 1, LANES)] + acc[3, T.Ramp(0, 1, LANES)]))

    return fmatmul
