"""Repack GGUF Q4_1 / Q8_0 blocks into the layout the 4-bit kernels read, and a NumPy reference of exactly
what those kernels compute.

Layout ("16-row interleaved", see docs/kernels.md). A weight W [N, K] (GGUF order: [out, in]) is cut into
row blocks of 16 output rows and groups of 32 inputs. For each (row block `nb`, group `g`) the kernel
issues AVX-512 VNNI dot products whose 16 int32 lanes are the 16 rows, each lane summing 4 adjacent inputs:

- Q4_1 `qweight` uint32 [N/16, K/32, 4, 16]: word (nb, g, t, r) holds the 4 GGUF bytes qs[4t .. 4t+3] of
  row nb*16+r, group g. Low nibbles are inputs 4t+j, high nibbles inputs 16+4t+j (GGUF's own split), so
  the repack is a byte transpose. `scale` d and `min` m: float16 [N/16, K/32, 16]. value = d*q + m.
  20 bytes per 32 weights: 5 bits/weight, as in the GGUF.
- Q8_0 `qweight` uint32 [N/16, K/32, 8, 16]: word (nb, g, t, r) holds inputs 4t .. 4t+3 of row nb*16+r as
  unsigned bytes q+128 (VNNI multiplies unsigned by signed). `scale` float16 [N/16, K/32, 16]. value = d*q.

Activations are quantized per group of 32 like llama.cpp's Q8_1: xd = max|x|/127, xq = round(x/xd) (half to
even), xds = xd * sum(xq). The kernels compute, per row and group, in fp32:
  Q4_1: (d*xd) * dot(q, xq) + m * xds
  Q8_0: (d*xd) * dot(q+128, xq) - 128 * d * xds      (= d*xd*dot(q, xq))
and sum the groups in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROWS = 16
GROUP = 32
Q4_1_BLOCK_BYTES = 20
Q8_0_BLOCK_BYTES = 34
GGML_TYPE_Q4_1 = 3
GGML_TYPE_Q8_0 = 8


@dataclass(frozen=True)
class PackedWeight:
    """A quantized weight in the kernel layout."""

    kind: str
    """"q4_1" or "q8_0"."""
    out_features: int
    """N: rows of W (multiple of 16)."""
    in_features: int
    """K: columns of W (multiple of 32)."""
    qweight: np.ndarray
    """uint32 [N/16, K/32, 4 (q4_1) or 8 (q8_0), 16]."""
    scale: np.ndarray
    """float16 [N/16, K/32, 16]."""
    min: np.ndarray | None
    """float16 [N/16, K/32, 16] for q4_1; None for q8_0."""

    def arrays(self) -> list[np.ndarray]:
        """The parameter arrays in the order the kernels take them."""
        return [self.qweight, self.scale] if self.min is None else [self.qweight, self.scale, self.min]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


def _check_shape(n: int, k: int) -> None:
    if n % ROWS or k % GROUP:
        raise ValueError(f"weight shape [{n}, {k}] unsupported: rows must be a multiple of {ROWS}, "
                         f"columns a multiple of {GROUP}")


def _blocks(raw: np.ndarray, n: int, k: int, block_bytes: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    expected = n * (k // GROUP) * block_bytes
    if raw.size != expected:
        raise ValueError(f"expected {expected} bytes of blocks for [{n}, {k}], got {raw.size}")
    return raw.reshape(n, k // GROUP, block_bytes)


def _interleave(per_row: np.ndarray, words: int) -> np.ndarray:
    """[N, G, words*4] bytes -> uint32 [N/16, G, words, 16] (row r's 4 bytes in lane r)."""
    n, g, _ = per_row.shape
    t = per_row.reshape(n // ROWS, ROWS, g, words, 4).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(t).view(np.uint32).reshape(n // ROWS, g, words, ROWS)


def _row_major_halves(per_row: np.ndarray, dtype: type) -> np.ndarray:
    """[N, G, 2 bytes] -> dtype [N/16, G, 16]."""
    n, g, _ = per_row.shape
    vals = np.ascontiguousarray(per_row).view(dtype).reshape(n, g)
    return np.ascontiguousarray(vals.reshape(n // ROWS, ROWS, g).transpose(0, 2, 1))


def pack_q4_1(raw: np.ndarray, out_features: int, in_features: int) -> PackedWeight:
    """Repack GGUF Q4_1 blocks (raw bytes of a [out, in] tensor) into the kernel layout."""
    _check_shape(out_features, in_features)
    b = _blocks(raw, out_features, in_features, Q4_1_BLOCK_BYTES)
    scale, wmin = _row_major_halves(b[:, :, 0:2], np.float16), _row_major_halves(b[:, :, 2:4], np.float16)
    return PackedWeight("q4_1", out_features, in_features, _interleave(b[:, :, 4:], 4), scale, wmin)


def pack_q8_0(raw: np.ndarray, out_features: int, in_features: int) -> PackedWeight:
    """Repack GGUF Q8_0 blocks (raw bytes of a [out, in] tensor) into the kernel layout."""
    _check_shape(out_features, in_features)
    b = _blocks(raw, out_features, in_features, Q8_0_BLOCK_BYTES)
    biased = b[:, :, 2:] ^ np.uint8(0x80)
    return PackedWeight("q8_0", out_features, in_features, _interleave(biased, 8),
                        _row_major_halves(b[:, :, 0:2], np.float16), None)


def pack_gguf_tensor(tensor: object) -> PackedWeight:
    """Pack a `gguf.GGUFReader` tensor (Q4_1 or Q8_0) whose NumPy shape is [out, in]."""
    kind = {GGML_TYPE_Q4_1: "q4_1", GGML_TYPE_Q8_0: "q8_0"}.get(int(tensor.tensor_type))
    if kind is None:
        raise ValueError(f"tensor {tensor.name}: type {tensor.tensor_type!r} is not Q4_1 or Q8_0")
    k, n = (int(s) for s in tensor.shape)
    return (pack_q4_1 if kind == "q4_1" else pack_q8_0)(tensor.data, n, k)


def concat_packed(weights: list[PackedWeight]) -> PackedWeight:
    """Stack weights of one kind and input size along the output axis (e.g. q, k, v into one qkv)."""
    first = weights[0]
    if any(w.kind != first.kind or w.in_features != first.in_features for w in weights):
        raise ValueError("concat_packed needs weights of one kind and one input size")
    return PackedWeight(
        first.kind, sum(w.out_features for w in weights), first.in_features,
        np.concatenate([w.qweight for w in weights]), np.concatenate([w.scale for w in weights]),
        None if first.min is None else np.concatenate([w.min for w in weights]),
    )


# ---------------------------------------------------------------- reference of the kernels' math (NumPy)

def unpack_codes(w: PackedWeight) -> np.ndarray:
    """Integer codes [N, K] as the kernel multiplies them: 0..15 (q4_1) or q+128 in 0..255 (q8_0)."""
    nb, g, words, _ = w.qweight.shape
    by = w.qweight.view(np.uint8).reshape(nb, g, words, ROWS, 4).transpose(0, 3, 1, 2, 4)  # nb r g t j
    by = by.reshape(nb * ROWS, g, words * 4)
    if w.kind == "q8_0":
        return by.reshape(nb * ROWS, g * GROUP).astype(np.int32)
    codes = np.concatenate([by & 0x0F, by >> 4], axis=2)  # [N, G, 32]: inputs 0..15 then 16..31
    return codes.reshape(nb * ROWS, g * GROUP).astype(np.int32)


def _per_row(a: np.ndarray) -> np.ndarray:
    """float16 [N/16, G, 16] -> float32 [N, G]."""
    nb, g, _ = a.shape
    return a.astype(np.float32).transpose(0, 2, 1).reshape(nb * ROWS, g)


def dequantize(w: PackedWeight) -> np.ndarray:
    """fp32 W [N, K] from the packed arrays (equals gguf's dequantize of the source tensor)."""
    codes = unpack_codes(w).reshape(w.out_features, -1, GROUP).astype(np.float32)
    d = _per_row(w.scale)[:, :, None]
    if w.kind == "q8_0":
        return ((codes - 128.0) * d).reshape(w.out_features, w.in_features)
    return (codes * d + _per_row(w.min)[:, :, None]).reshape(w.out_features, w.in_features)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x fp32 [B, K] -> (xq int8 [B, K], xd fp32 [B, K/32], xds fp32 [B, K/32]) as the kernels do."""
    b, k = x.shape
    xg = x.astype(np.float32).reshape(b, k // GROUP, GROUP)
    amax = np.abs(xg).max(axis=2)
    xd = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.where(xd > 0, np.float32(1.0) / np.where(xd > 0, xd, 1), 0).astype(np.float32)
    xq = np.rint(xg * inv[:, :, None]).astype(np.int8)
    xds = (xd * xq.astype(np.int32).sum(axis=2).astype(np.float32)).astype(np.float32)
    return xq.reshape(b, k), xd, xds


def reference_matmul(x: np.ndarray, w: PackedWeight) -> np.ndarray:
    """y [B, N] = x [B, K] · Wᵀ computed the way the kernels compute it (int8 activations, fp32 finish)."""
    xq, xd, xds = quantize_activations(x)
    b = x.shape[0]
    g = w.in_features // GROUP
    codes = unpack_codes(w).reshape(w.out_features, g, GROUP)
    dots = np.einsum("ngk,bgk->bng", codes, xq.reshape(b, g, GROUP).astype(np.int32)).astype(np.float32)
    d = _per_row(w.scale)[None]
    scaled = dots * (d * xd[:, None, :])
    if w.kind == "q8_0":
        terms = scaled - d * (np.float32(128.0) * xds[:, None, :])
    else:
        terms = scaled + _per_row(w.min)[None] * xds[:, None, :]
    return terms.sum(axis=2, dtype=np.float32)
