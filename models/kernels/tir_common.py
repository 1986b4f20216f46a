"""TIR expression builders shared by the quantized matmul kernels: VNNI and portable 4-byte dot products
over the 16-row interleaved layout (models/kernels/quant.py), and target detection."""

from __future__ import annotations

import math
from typing import Any

import tvm
from tvm import tirx

LANES = 16
NIBBLES = 0x0F0F0F0F
VNNI_INTRIN = "llvm.x86.avx512.vpdpbusd.512"


def as_target(target: Any) -> tvm.target.Target:
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def has_vnni(target: Any) -> bool:
    """True when the llvm target can run AVX-512 VNNI (`vpdpbusd` on 512-bit vectors)."""
    target = as_target(target)
    if target.kind.name != "llvm":
        return False
    from tvm.target import codegen

    return bool(codegen.target_has_features("avx512vnni", target)) and bool(
        codegen.target_has_features("avx512bw", target))


def has_avx2(target: Any) -> bool:
    """True when the llvm target is x86 with AVX2 (`vpmaddubsw` / `vpmaddwd` on 256-bit vectors)."""
    target = as_target(target)
    if target.kind.name != "llvm":
        return False
    from tvm.target import codegen

    return bool(codegen.target_has_features("avx2", target))


def host_has_avx2() -> bool:
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    return has_avx2({"kind": "llvm", "mcpu": cpu}) if cpu and cpu != "generic" else False


def host_has_vnni() -> bool:
    """Whether the machine running this process has AVX-512 VNNI (per LLVM's host CPU name)."""
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    return has_vnni({"kind": "llvm", "mcpu": cpu}) if cpu and cpu != "generic" else False


def u32(value: int) -> tirx.PrimExpr:
    return tirx.const(value, "uint32")


def bcast(value: Any, lanes: int = LANES) -> tirx.PrimExpr:
    return tirx.Broadcast(value, lanes)


def nibbles_low(words: tirx.PrimExpr) -> tirx.PrimExpr:
    """Low nibble of each byte of a uint32x16 vector (codes 0..15, one per byte)."""
    return tirx.bitwise_and(words, bcast(u32(NIBBLES)))


def nibbles_high(words: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.bitwise_and(tirx.shift_right(words, bcast(u32(4))), bcast(u32(NIBBLES)))


def dot4_vnni(acc: tirx.PrimExpr, codes: tirx.PrimExpr, xword: tirx.PrimExpr) -> tirx.PrimExpr:
    """acc[r] += sum_j codes.byte(r, j) (unsigned) * xword.byte(j) (signed), one `vpdpbusd`."""
    return tirx.call_llvm_pure_intrin(
        "int32x16", VNNI_INTRIN, acc,
        tirx.reinterpret("int8x64", codes),
        tirx.reinterpret("int8x64", bcast(xword)),
    )


def dot4_portable(acc: tirx.PrimExpr, codes: tirx.PrimExpr, xword: tirx.PrimExpr) -> tirx.PrimExpr:
    """The same integer sum as `dot4_vnni` with plain vector shifts and multiplies (any llvm target)."""
    total = acc
    for j in range(4):
        code = tirx.Cast("int32x16", tirx.bitwise_and(tirx.shift_right(codes, bcast(u32(8 * j))),
                                                        bcast(u32(0xFF))))
        xbyte = tirx.shift_right(tirx.shift_left(xword, tirx.const(24 - 8 * j, "int32")),
                                 tirx.const(24, "int32"))
        total = total + code * bcast(xbyte)
    return total


def group_dot(kind: str, vnni: bool, qw: tirx.Buffer, nb: tirx.PrimExpr, g: tirx.PrimExpr,
              xq: tirx.Buffer, b: tirx.PrimExpr, chains: int = 4) -> tirx.PrimExpr:
    """int32x16: for the 16 rows of block `nb`, the integer dot product of group `g` with activation row `b`.

    `qw` is the packed weight buffer [NB, G, 4|8, 16] uint32, `xq` the packed activations [B, K/4] int32.
    The 8 four-byte steps are split over `chains` independent accumulators (1, 2, 4 or 8), so the VNNI
    latency overlaps when nothing else does (GEMV); GEMM tiles interleave rows instead and use 1."""
    if chains not in (1, 2, 4, 8):
        raise ValueError(f"chains must be 1, 2, 4 or 8, got {chains}")
    dot = dot4_vnni if vnni else dot4_portable
    steps = []  # (code vector, activation word) for the group's 8 four-byte steps
    for t in range(4 if kind == "q4_1" else 8):
        w = qw[nb, g, t, tirx.Ramp(0, 1, LANES)]
        if kind == "q4_1":
            steps += [(nibbles_low(w), xq[b, g * 8 + t]), (nibbles_high(w), xq[b, g * 8 + 4 + t])]
        else:
            steps.append((w, xq[b, g * 8 + t]))
    accs = [bcast(tirx.const(0, "int32"))] * chains
    for i, (codes, xword) in enumerate(steps):
        accs[i % chains] = dot(accs[i % chains], codes, xword)
    while len(accs) > 1:
        accs = [accs[i] + accs[i + 1] for i in range(0, len(accs), 2)]
    return accs[0]


def row_vec(buf: tirx.Buffer, nb: tirx.PrimExpr, g: tirx.PrimExpr) -> tirx.PrimExpr:
    """The 16 per-row values (scale or min) of row block `nb`, group `g`."""
    return buf[nb, g, tirx.Ramp(0, 1, LANES)]


def group_finish(kind: str, acc: tirx.PrimExpr, dot: tirx.PrimExpr, scale: tirx.PrimExpr,
                 wmin: tirx.PrimExpr, xd: tirx.PrimExpr, xds: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32x16 accumulator after one group: see the formulas in models/kernels/quant.py (`wmin` is
    ignored for q8_0)."""
    d = tirx.Cast("float32x16", scale)
    term = tirx.Cast("float32x16", dot) * (d * bcast(xd))
    if kind == "q4_1":
        return acc + term + tirx.Cast("float32x16", wmin) * bcast(xds)
    return acc + (term - d * bcast(xds * tirx.const(128.0, "float32")))


# ---------------------------------------------------------------- float vector helpers (attention, norms)

_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
              2.402264791363012e-1, 6.931472028550421e-1)


def f32x16(value: float) -> tirx.PrimExpr:
    return tirx.Broadcast(tirx.const(value, "float32"), LANES)


def vsum(vec: tirx.PrimExpr) -> tirx.PrimExpr:
    """Sum of a float32x16 vector by halving shuffles."""
    lanes = LANES
    while lanes > 1:
        lanes //= 2
        vec = tirx.Shuffle([vec], list(range(lanes))) + tirx.Shuffle([vec], list(range(lanes, 2 * lanes)))
    return vec


def vexp2(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^x of a float32x16 vector: 2^n · 2^f with n = round(x), |f| ≤ 1/2, 2^f by Cephes' exp2f polynomial
    (~2e-7 relative), 2^n built in the exponent bits. Inputs are clamped to [-126, 127]."""
    t = tirx.max(tirx.min(x, f32x16(127.0)), f32x16(-126.0))
    n = tirx.floor(t + f32x16(0.5))
    f = t - n
    poly = f32x16(_EXP2_POLY[0])
    for c in _EXP2_POLY[1:]:
        poly = poly * f + f32x16(c)
    two_f = poly * f + f32x16(1.0)
    bits = tirx.shift_left(tirx.Cast("int32x16", n) + tirx.Broadcast(tirx.const(127, "int32"), LANES),
                           tirx.Broadcast(tirx.const(23, "int32"), LANES))
    return two_f * tirx.reinterpret("float32x16", bits)


def vexp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e^x of a float32x16 vector (`vexp2` of x·log2 e)."""
    return vexp2(x * f32x16(1.0 / math.log(2.0)))
