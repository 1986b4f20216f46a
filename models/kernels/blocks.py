"""Every common GGUF block type in the layout the generic quantized kernels read (models/kernels/qmatmul.py):
decode the GGUF blocks into integer codes and per-group scales with NumPy, repack them once at load.

Kinds and what the kernels keep per weight matrix W [N, K] (16-row interleaved like quant.py; `NB` = N/16 row
blocks, `G` = K/32 groups, `S` = K/256 super-blocks). A weight is value = s·(code − o) (symmetric kinds) or
s·code − m (affine kinds), per group of 32 inputs (Q6_K: per half group of 16):

| kind | codes, words/group | per-row parameters (kernel order after `qweight`) | s, o / m |
|---|---|---|---|
| q4_0 | 4-bit, 4 | `d` f16 [NB,G,16] | s = d, o = 8 |
| q4_1 | 4-bit, 4 | `d`, `m` f16 [NB,G,16] | s = d, m = −m_gguf |
| q8_0 | 8-bit, 8 | `d` f16 [NB,G,16] | s = d, o = 128 (codes q + 128) |
| q5_0 | 5-bit, 5 | `d` f16 [NB,G,16] | s = d, o = 16 |
| q5_1 | 5-bit, 5 | `d`, `m` f16 [NB,G,16] | s = d, m = −m_gguf |
| q4_k | 4-bit, 4 | `d`, `dmin` f16 [NB,S,16]; `sc`, `mn` u8 [NB,G,16] | s = d·sc, m = dmin·mn |
| q5_k | 5-bit, 5 | as q4_k | as q4_k |
| q6_k | 6-bit, 6 | `d` f16 [NB,S,16]; `sc` i8 [NB,G,2,16] | s = d·sc (per half), o = 32 |
| f16, bf16 | — | `weight` u16 [NB,K,16] (the 16 rows' values of input k side by side) | — |

(q4_1 and q8_0 are quant.py's layout, same arrays.) Code words, uint32 [NB, G, words, 16]: a group's 32
inputs are 8 steps of 4; step s (inputs 4s..4s+3) takes word s's bytes (8-bit), else the low (s < 4) or high
(s ≥ 4) nibbles of word s mod 4, plus high bits: 5-bit: bit 8j+s of word 4 is bit 4 of input 4s+j; 6-bit:
bits 8j+2(s mod 4)+{0,1} of word 4 + s//4 are bits 4–5 of input 4s+j. Bits per weight equal the GGUF's
(K-quants: +0.125 for the 6-bit scales and mins kept as bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROWS = 16
GROUP = 32
SUPER = 256


@dataclass(frozen=True)
class BlockKind:
    """How one GGUF block type is laid out for the generic kernels."""

    name: str
    ggml_type: int
    """GGMLQuantizationType value."""
    block: int
    """Inputs per GGUF block (32, or 256 for the K-quants)."""
    block_bytes: int
    bits: int
    """Code width: 4, 5, 6, 8, or 16 for the float kinds."""
    offset: int
    """o of symmetric kinds (value = s·(code − o)); 0 for affine and float kinds."""
    affine: bool
    """value = s·code − m."""
    params: tuple[str, ...]
    """Parameter arrays after `qweight` (float kinds: `weight` only)."""

    @property
    def words(self) -> int:
        return {4: 4, 5: 5, 6: 6, 8: 8}[self.bits]

    @property
    def is_float(self) -> bool:
        return self.bits == 16

    @property
    def k_quant(self) -> bool:
        return self.block == SUPER


KINDS: dict[str, BlockKind] = {k.name: k for k in (
    BlockKind("q4_0", 2, 32, 18, 4, 8, False, ("d",)),
    BlockKind("q4_1", 3, 32, 20, 4, 0, True, ("d", "m")),
    BlockKind("q8_0", 8, 32, 34, 8, 128, False, ("d",)),
    BlockKind("q5_0", 6, 32, 22, 5, 16, False, ("d",)),
    BlockKind("q5_1", 7, 32, 24, 5, 0, True, ("d", "m")),
    BlockKind("q4_k", 12, 256, 144, 4, 0, True, ("d", "dmin", "sc", "mn")),
    BlockKind("q5_k", 13, 256, 176, 5, 0, True, ("d", "dmin", "sc", "mn")),
    BlockKind("q6_k", 14, 256, 210, 6, 32, False, ("d", "sc")),
    BlockKind("f16", 1, 1, 2, 16, 0, False, ("weight",)),
    BlockKind("bf16", 30, 1, 2, 16, 0, False, ("weight",)),
)}
ALL_KINDS = tuple(KINDS)
"""Every block type a native build keeps as it is in the GGUF (the generic kernels run them all; a native
build multiplies q4_1 / q8_0 with their tuned kernels, gemv_q4.py, whose packed arrays are the same)."""
TUNED_KINDS = ("q4_1", "q8_0")
KIND_OF_GGML_TYPE = {k.ggml_type: k.name for k in KINDS.values()}


def block_kind(kind: str) -> BlockKind:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"no kernel for block type {kind!r}; expected one of {ALL_KINDS}") from None


def check_shape(kind: str, n: int, k: int) -> None:
    """ValueError unless W [n, k] of `kind` fits the kernels (16-row blocks, whole GGUF blocks per row)."""
    spec = block_kind(kind)
    step = max(spec.block, GROUP)
    if n % ROWS or k % step:
        raise ValueError(f"{kind} weight [{n}, {k}] unsupported: rows must be a multiple of {ROWS}, "
                         f"columns a multiple of {step}")


@dataclass(frozen=True)
class PackedTensor:
    """A weight W [out_features, in_features] of one block type in the generic kernels' layout."""

    kind: str
    out_features: int
    in_features: int
    arrays: tuple[tuple[str, np.ndarray], ...]
    """(parameter name, array) in the order the kernels take them: qweight first (float kinds: weight)."""

    def param_dict(self) -> dict[str, np.ndarray]:
        return dict(self.arrays)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self.arrays)


# ---------------------------------------------------------------- decoding GGUF blocks (NumPy)

@dataclass(frozen=True)
class Decoded:
    """Integer codes and per-row parameters of a GGUF tensor, row-major ([N, ...])."""

    codes: np.ndarray
    """uint8 [N, K] (float kinds: uint16 [N, K] raw values)."""
    params: dict[str, np.ndarray]
    """d/dmin/m: float16 [N, G] or [N, S]; sc/mn: uint8 [N, G] (q6_k: int8 [N, G, 2])."""


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> float16 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _halves(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes of a 32-block (element i in the low nibble, i+16 in the high) -> [..., 32] codes."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed scale bytes of a Q4_K / Q5_K block -> 6-bit (sc, mn) [..., 8] (llama.cpp's
    get_scale_min_k4)."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def decode_blocks(kind: str, raw: np.ndarray, n: int, k: int) -> Decoded:
    """GGUF blocks of a [n, k] tensor (raw bytes, row-major) -> codes and parameters."""
    spec = block_kind(kind)
    check_shape(kind, n, k)
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    expected = n * (k // spec.block) * spec.block_bytes
    if raw.size != expected:
        raise ValueError(f"{kind} tensor [{n}, {k}]: expected {expected} bytes of blocks, got {raw.size}")
    if spec.is_float:
        return Decoded(raw.view(np.uint16).reshape(n, k), {})
    b = raw.reshape(n, k // spec.block, spec.block_bytes)
    if kind == "q4_0":
        return Decoded(_halves(b[..., 2:]).reshape(n, k), {"d": _f16(b[..., 0:2])})
    if kind == "q4_1":
        return Decoded(_halves(b[..., 4:]).reshape(n, k), {"d": _f16(b[..., 0:2]), "m": _f16(b[..., 2:4])})
    if kind == "q8_0":  # codes are the biased bytes q + 128
        return Decoded((b[..., 2:] ^ np.uint8(0x80)).reshape(n, k), {"d": _f16(b[..., 0:2])})
    if kind in ("q5_0", "q5_1"):
        at = 2 if kind == "q5_0" else 4
        qh = np.ascontiguousarray(b[..., at:at + 4]).view(np.uint32)  # [n, G, 1]
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [n, G, 32]
        codes = (_halves(b[..., at + 4:]) | (high << 4)).reshape(n, k)
        params = {"d": _f16(b[..., 0:2])}
        if kind == "q5_1":
            params["m"] = _f16(b[..., 2:4])
        return Decoded(codes, params)
    if kind in ("q4_k", "q5_k"):
        sc, mn = _k_scales(b[..., 4:16])  # [n, S, 8]
        qs = b[..., -128:].reshape(n, -1, 4, 32)  # chunk c: sub-blocks 2c (low nibbles), 2c+1 (high)
        codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, 8, 32)
        if kind == "q5_k":
            qh = b[..., 16:48]  # [n, S, 32]: bit sb of byte l is bit 4 of element 32·sb + l
            codes = codes | ((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
        params = {"d": _f16(b[..., 0:2]), "dmin": _f16(b[..., 2:4]),
                  "sc": sc.reshape(n, -1), "mn": mn.reshape(n, -1)}
        return Decoded(codes.reshape(n, k).astype(np.uint8), params)
    # q6_k: ql[128] qh[64] scales[16] d — per 128-element half h: ql[64h:64h+64] low nibbles are elements
    # 0..63 and high nibbles 64..127; qh[32h:32h+32] >> (0, 2, 4, 6) & 3 are bits 4-5 of elements 0..127.
    ql = b[..., 0:128].reshape(n, -1, 2, 64)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # [n, S, 2, 128]
    qh = b[..., 128:192].reshape(n, -1, 2, 1, 32)
    high = ((qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).reshape(n, -1, 2, 128)
    codes = (low | (high << 4)).reshape(n, k)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(n, k // 32, 2)
    return Decoded(codes.astype(np.uint8), {"d": _f16(b[..., 208:210]), "sc": sc})


def dequantize_decoded(kind: str, dec: Decoded) -> np.ndarray:
    """fp32 W [N, K] as the embedding kernel computes it (equals gguf's dequantize)."""
    spec = block_kind(kind)
    n, k = dec.codes.shape
    if kind == "f16":
        return dec.codes.view(np.float16).astype(np.float32)
    if kind == "bf16":
        return (dec.codes.astype(np.uint32) << 16).view(np.float32)
    s, m = group_scales(kind, dec.params, n, k)  # [N, G, 2]
    codes = dec.codes.reshape(n, k // GROUP, 2, GROUP // 2).astype(np.float32)
    if spec.affine:
        return (s[..., None] * codes - m[..., None]).reshape(n, k).astype(np.float32)
    return (s[..., None] * (codes - np.float32(spec.offset))).reshape(n, k).astype(np.float32)


def group_scales(kind: str, params: dict[str, np.ndarray], n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """fp32 (s, m) [N, G, 2] per half group, computed as the kernels do (every product exact in fp32)."""
    g = k // GROUP
    f32 = np.float32
    if kind in ("q4_k", "q5_k"):
        d = np.repeat(params["d"].astype(f32), 8, axis=1)
        dmin = np.repeat(params["dmin"].astype(f32), 8, axis=1)
        s, m = d * params["sc"].astype(f32), dmin * params["mn"].astype(f32)
    elif kind == "q6_k":
        d = np.repeat(params["d"].astype(f32), 8, axis=1)[:, :, None]
        return d * params["sc"].astype(f32), np.zeros((n, g, 2), f32)
    else:
        s = params["d"].astype(f32)
        m = -params["m"].astype(f32) if "m" in params else np.zeros((n, g), f32)
    return np.repeat(s[:, :, None], 2, axis=2), np.repeat(m[:, :, None], 2, axis=2)


# ---------------------------------------------------------------- repacking for the kernels

def _interleave(per_row: np.ndarray) -> np.ndarray:
    """[N, G, words*4] bytes -> uint32 [N/16, G, words, 16] (row r's 4 bytes in lane r)."""
    n, g, nbytes = per_row.shape
    t = per_row.reshape(n // ROWS, ROWS, g, nbytes // 4, 4).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(t).view(np.uint32).reshape(n // ROWS, g, nbytes // 4, ROWS)


def _code_bytes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, K] -> [N, G, words*4] bytes in the step order described in the module docstring."""
    n, k = codes.shape
    c = codes.reshape(n, k // GROUP, 8, 4)  # [N, G, step s, lane byte j]: input 4s + j
    if bits == 8:
        return c.reshape(n, k // GROUP, 32)
    nib = (c[:, :, :4] & 0x0F) | ((c[:, :, 4:] & 0x0F) << 4)  # word t: steps t (low) and 4+t (high)
    parts = [nib.reshape(n, k // GROUP, 16)]
    hi = (c >> 4).astype(np.uint32)  # [N, G, 8, 4]
    shifts = 8 * np.arange(4, dtype=np.uint32)  # lane byte j
    if bits == 5:
        bit = shifts + np.arange(8, dtype=np.uint32)[:, None]  # [step s, byte j]: 8j + s
        word = ((hi & 1) << bit).sum(axis=(2, 3), dtype=np.uint32)
        parts.append(word[..., None].view(np.uint8))
    elif bits == 6:
        for half in range(2):
            h = hi[:, :, 4 * half:4 * half + 4] & 3  # steps 4·half + u
            bit = shifts + 2 * np.arange(4, dtype=np.uint32)[:, None]
            word = (h << bit).sum(axis=(2, 3), dtype=np.uint32)
            parts.append(word[..., None].view(np.uint8))
    return np.concatenate([p.reshape(n, k // GROUP, -1) for p in parts], axis=2)


def _lanes(a: np.ndarray) -> np.ndarray:
    """[N, X, ...] -> [N/16, X, ..., 16]: the 16 rows of a block side by side."""
    n = a.shape[0]
    moved = np.moveaxis(a.reshape(n // ROWS, ROWS, *a.shape[1:]), 1, -1)
    return np.ascontiguousarray(moved)


def pack_decoded(kind: str, dec: Decoded) -> PackedTensor:
    spec = block_kind(kind)
    n, k = dec.codes.shape
    if spec.is_float:
        return PackedTensor(kind, n, k, (("weight", _lanes(dec.codes)),))
    arrays = [("qweight", _interleave(_code_bytes(dec.codes, spec.bits)))]
    arrays += [(name, _lanes(dec.params[name])) for name in spec.params]
    return PackedTensor(kind, n, k, tuple(arrays))


PACK_WEIGHTS = 1 << 21
"""Weights decoded and packed at a time (whole 16-row blocks): decoding a whole tensor's blocks at once holds
~12× its packed size in NumPy temporaries (a 49152 × 2048 Q6_K embedding: 944 MiB over its 79 MiB), which
set a model's peak RSS at load; 2M weights a chunk keep them near 25 MiB."""


def pack_blocks(kind: str, raw: np.ndarray, n: int, k: int) -> PackedTensor:
    """Repack a GGUF tensor of block type `kind` (raw bytes of a [n, k] = [out, in] tensor), a chunk of rows
    at a time (`PACK_WEIGHTS`) into arrays allocated once (every array's first axis is the 16-row block)."""
    check_shape(kind, n, k)
    chunk = max(ROWS, PACK_WEIGHTS // k // ROWS * ROWS)
    if n <= chunk:
        return pack_decoded(kind, decode_blocks(kind, raw, n, k))
    rows = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, -1)
    out: list[tuple[str, np.ndarray]] = []
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        part = pack_decoded(kind, decode_blocks(kind, rows[start:start + count], count, k))
        if not out:
            out = [(name, np.empty((n // ROWS, *a.shape[1:]), a.dtype)) for name, a in part.arrays]
        for (_, dst), (_, src) in zip(out, part.arrays, strict=True):
            dst[start // ROWS:(start + count) // ROWS] = src
    return PackedTensor(kind, n, k, tuple(out))


def concat_tensors(parts: list[PackedTensor]) -> PackedTensor:
    """Stack weights of one kind and input size along the output axis (q, k, v -> qkv)."""
    first = parts[0]
    if any(p.kind != first.kind or p.in_features != first.in_features for p in parts):
        raise ValueError("concat_tensors needs weights of one kind and one input size")
    arrays = tuple((name, np.concatenate([p.param_dict()[name] for p in parts]))
                   for name, _ in first.arrays)
    return PackedTensor(first.kind, sum(p.out_features for p in parts), first.in_features, arrays)


# ---------------------------------------------------------------- reading the layout back (NumPy)

def _unlanes(a: np.ndarray) -> np.ndarray:
    """Inverse of `_lanes`."""
    nb = a.shape[0]
    return np.ascontiguousarray(np.moveaxis(a, -1, 1)).reshape(nb * ROWS, *a.shape[1:-1])


def unpack(w: PackedTensor) -> Decoded:
    """The codes and parameters back from the packed arrays (what the kernels see), row-major."""
    spec = block_kind(w.kind)
    arrays = w.param_dict()
    n, k = w.out_features, w.in_features
    if spec.is_float:
        return Decoded(_unlanes(arrays["weight"]), {})
    qw = arrays["qweight"]
    by = qw.view(np.uint8).reshape(n // ROWS, k // GROUP, spec.words, ROWS, 4).transpose(0, 3, 1, 2, 4)
    by = by.reshape(n, k // GROUP, spec.words * 4)
    if spec.bits == 8:
        codes = by.reshape(n, k)
    else:
        nib = by[:, :, :16].reshape(n, k // GROUP, 4, 4)
        c = np.concatenate([nib & 0x0F, nib >> 4], axis=2).astype(np.uint32)  # [N, G, 8 steps, 4]
        words = by[:, :, 16:].copy().view(np.uint32)  # [N, G, 1 or 2]
        shifts = 8 * np.arange(4, dtype=np.uint32)
        for s in range(8 if spec.bits > 4 else 0):
            if spec.bits == 5:
                c[:, :, s] |= ((words[:, :, 0:1] >> (shifts + s)) & 1) << 4
            else:
                c[:, :, s] |= ((words[:, :, s // 4:s // 4 + 1] >> (shifts + 2 * (s % 4))) & 3) << 4
        codes = c.reshape(n, k).astype(np.uint8)
    return Decoded(codes, {name: _unlanes(arrays[name]) for name in spec.params})
