"""The integer dot products of the generic block-type kernels (qmatmul.py): a group's codes (4/5/6/8-bit,
blocks.py's layout) against int8 activations, per instruction set — AVX-512 VNNI, AVX2 or portable vector
code — always the exact integers."""

from __future__ import annotations

from typing import Any

from shoal.models.kernels.tir_common import LANES, bcast, dot4_portable, dot4_vnni, u32
from tvm import tirx


def step_codes(bits: int, qw: tirx.Buffer, nb: Any, g: Any, s: int) -> tirx.PrimExpr:
    """uint32x16: the codes of step s (inputs 4s..4s+3) of the 16 rows, one per byte."""
    def word(t: int) -> tirx.PrimExpr:
        return qw[nb, g, t, tirx.Ramp(0, 1, LANES)]

    if bits == 8:
        return word(s)
    w = word(s % 4)
    if s >= 4:
        w = tirx.shift_right(w, bcast(u32(4)))
    codes = tirx.bitwise_and(w, bcast(u32(0x0F0F0F0F)))
    if bits == 5:
        high = tirx.bitwise_and(tirx.shift_right(word(4), bcast(u32(s))), bcast(u32(0x01010101)))
    elif bits == 6:
        high = tirx.bitwise_and(tirx.shift_right(word(4 + s // 4), bcast(u32(2 * (s % 4)))),
                                bcast(u32(0x03030303)))
    else:
        return codes
    return tirx.bitwise_or(codes, tirx.shift_left(high, bcast(u32(4))))


ISAS = ("vnni", "avx2", "portable")


def _lanes(vec: tirx.PrimExpr, start: int, count: int) -> tirx.PrimExpr:
    return tirx.Shuffle([vec], [tirx.const(i, "int32") for i in range(start, start + count)])


def _avx2_half(bits: int, codes: list[tirx.PrimExpr], xwords: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """int32x16 sum over steps of codes·x with AVX2: `vpmaddubsw` (u8 × s8, adjacent pairs summed to s16)
    on each 256-bit half of the 16 lanes, s16 sums of up to 32767 / (2·max code·127) steps, then `vpmaddwd`
    by ones to s32. Exact: codes ≤ 63 and |x| ≤ 127 never saturate the s16 sums. 8-bit codes (q + 128)
    give the centred dot Σ q·x instead: `vpmaddubsw(|q|, vpsignb(x, q))` (|q| ≤ 128 as u8, |x| ≤ 127, so
    |q|·|x| ≤ 16256 per product)."""
    if bits == 8:
        return _avx2_centred_half(codes, xwords)
    per_sum = max(1, 32767 // (2 * ((1 << bits) - 1) * 127))
    ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
    total = None
    for first in range(0, len(codes), per_sum):
        halves = []
        for h in range(2):
            s16 = None
            for c, x in zip(codes[first:first + per_sum], xwords[first:first + per_sum], strict=True):
                cw = tirx.reinterpret("int8x32", _lanes(c, 8 * h, 8))
                xw = tirx.reinterpret("int8x32", tirx.Broadcast(x, 8))
                p = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", cw, xw)
                s16 = p if s16 is None else s16 + p
            halves.append(tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", s16, ones))
        part = tirx.Shuffle(halves, [tirx.const(i, "int32") for i in range(16)])
        total = part if total is None else total + part
    return total


def _avx2_centred_half(codes: list[tirx.PrimExpr], xwords: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
    bias = tirx.Broadcast(tirx.const(-128, "int8"), 32)
    total = None
    for c, x in zip(codes, xwords, strict=True):
        xv = tirx.reinterpret("int8x32", tirx.Broadcast(x, 8))
        halves = []
        for h in range(2):
            q = tirx.bitwise_xor(tirx.reinterpret("int8x32", _lanes(c, 8 * h, 8)), bias)  # code − 128
            aq = tirx.call_llvm_pure_intrin("int8x32", "llvm.abs", q, tirx.const(False, "bool"))  # u8 0..128
            signed = tirx.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", xv, q)
            s16 = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", aq, signed)
            halves.append(tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", s16, ones))
        part = tirx.Shuffle(halves, [tirx.const(i, "int32") for i in range(16)])
        total = part if total is None else total + part
    return total


def half_dots(bits: int, isa: str, qw: tirx.Buffer, nb: Any, g: Any, xq: tirx.Buffer,
              b: Any) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """int32x16 (dot over inputs 0..15, dot over inputs 16..31) of group g with activation row b (exact
    integers whatever the instruction set `isa`: "vnni", "avx2" or "portable"). With "avx2", 8-bit codes
    give centred dots (code − 128)·x: `centred_dots` says when."""
    if isa not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r}: expected one of {ISAS}")
    halves = []
    for half in range(2):
        steps = [4 * half + i for i in range(4)]
        codes = [step_codes(bits, qw, nb, g, s) for s in steps]
        xwords = [xq[b, g * 8 + s] for s in steps]
        if isa == "avx2":
            halves.append(_avx2_half(bits, codes, xwords))
            continue
        dot = dot4_vnni if isa == "vnni" else dot4_portable
        chains = [bcast(tirx.const(0, "int32"))] * 2
        for i, (c, x) in enumerate(zip(codes, xwords, strict=True)):
            chains[i % 2] = dot(chains[i % 2], c, x)
        halves.append(chains[0] + chains[1])
    return halves[0], halves[1]


def centred_dots(bits: int, isa: str) -> bool:
    """Whether `half_dots` returns Σ (code − 128)·x (8-bit codes on AVX2) instead of Σ code·x."""
    return bits == 8 and isa == "avx2"

