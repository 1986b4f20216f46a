"""NumPy twin of the generic block-type kernels (qmatmul.py, fmatmul.py, embed_any.py), bit for bit.

An fma is emulated in float64: the product of two fp32 values is exact there, one rounding to fp32 remains
(a double rounding that differs from a single one with probability ~2^-29 per operation).
"""

from __future__ import annotations

import numpy as np
from shoal.models.kernels.blocks import (
    GROUP,
    PackedTensor,
    block_kind,
    dequantize_decoded,
    group_scales,
    unpack,
)
from shoal.models.kernels.quant import quantize_activations

_F32 = np.float32
FLOAT_CHAINS = 4
"""Independent fma chains of the float kernels (input k feeds chain k mod 4)."""


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(_F32)


def activation_sums(xq: np.ndarray) -> np.ndarray:
    """int64 [B, G, 2]: the sums of the int8 activations per half group (the kernels' xs)."""
    b, k = xq.shape
    return xq.reshape(b, k // GROUP, 2, GROUP // 2).astype(np.int64).sum(axis=3)


def reference_matmul(x: np.ndarray, w: PackedTensor) -> np.ndarray:
    """y fp32 [B, N] = x [B, K] · Wᵀ as the kernels compute it (docstrings of qmatmul.py / fmatmul.py)."""
    spec = block_kind(w.kind)
    x = np.ascontiguousarray(x, dtype=_F32)
    if spec.is_float:
        return _float_matmul(x, w)
    dec = unpack(w)
    n, k = dec.codes.shape
    b, groups = x.shape[0], k // GROUP
    s, m = group_scales(w.kind, dec.params, n, k)  # [N, G, 2]
    xq, xd, _ = quantize_activations(x)
    xs = activation_sums(xq)
    codes = dec.codes.reshape(n, groups, 2, GROUP // 2).astype(np.float64)
    acts = xq.reshape(b, groups, 2, GROUP // 2).astype(np.float64)
    dots = np.einsum("nghi,bghi->gbnh", codes, acts)  # exact integers in float64
    acc = np.zeros((b, n), _F32)
    for g in range(groups):
        xdg = xd[:, g][:, None]
        if w.kind == "q6_k":
            for h in range(2):
                delta = dots[g, :, :, h] - 32.0 * xs[:, g, h][:, None]
                acc = _fma(delta, (s[None, :, g, h] * xdg).astype(_F32), acc)
            continue
        total = xs[:, g, 0] + xs[:, g, 1]
        if not spec.affine:
            delta = dots[g, :, :, 0] + dots[g, :, :, 1] - float(spec.offset) * total[:, None]
            acc = _fma(delta, (s[None, :, g, 0] * xdg).astype(_F32), acc)
            continue
        acc = _fma(dots[g, :, :, 0] + dots[g, :, :, 1], (s[None, :, g, 0] * xdg).astype(_F32), acc)
        xds = (xd[:, g] * total.astype(_F32)).astype(_F32)
        acc = _fma(-m[None, :, g, 0], xds[:, None], acc)
    return acc


def float_weights(w: PackedTensor) -> np.ndarray:
    """fp32 W [N, K] of an f16 / bf16 tensor (exact)."""
    return dequantize_decoded(w.kind, unpack(w))


def _float_matmul(x: np.ndarray, w: PackedTensor) -> np.ndarray:
    """FLOAT_CHAINS fma chains over k, then (c0 + c1) + (c2 + c3)."""
    wt = float_weights(w).astype(np.float64)  # [N, K]
    b, k = x.shape
    chains = np.zeros((FLOAT_CHAINS, b, w.out_features), _F32)
    xs = x.astype(np.float64)
    for i in range(k):
        c = i % FLOAT_CHAINS
        chains[c] = (xs[:, i:i + 1] * wt[None, :, i] + chains[c]).astype(_F32)
    return ((chains[0] + chains[1]) + (chains[2] + chains[3])).astype(_F32)


def reference_embedding(ids: np.ndarray, w: PackedTensor) -> np.ndarray:
    """fp32 rows of the dequantized table (embed_any.py; equals gguf's dequantize)."""
    return dequantize_decoded(w.kind, unpack(w))[np.asarray(ids)]
