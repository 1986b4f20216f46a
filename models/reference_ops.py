"""The reference's elementwise and small dense operations, in NumPy fp32 as llama.cpp computes them: RMSNorm,
RoPE in llama.cpp's NORM and NEOX layouts, SiLU, tanh-GELU, and the linear product."""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    scale = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(eps))
    return (x * scale.astype(np.float32)) * weight


def rope_norm(x: np.ndarray, positions: np.ndarray, theta: float,
              factors: np.ndarray | None = None) -> np.ndarray:
    """Rotate adjacent pairs (2i, 2i+1) of the last axis of x [n, heads, D] by position (llama.cpp NORM);
    frequency i is divided by `factors[i]` when given (rope_freqs)."""
    dim = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if factors is not None:
        inv_freq = inv_freq / factors.astype(np.float64)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [n, D/2]
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def rope_neox(x: np.ndarray, positions: np.ndarray, theta: float, scale: float = 1.0,
              factors: np.ndarray | None = None) -> np.ndarray:
    """Rotate pairs (i, i + D/2) of the last axis of x [n, heads, D] by position · scale (llama.cpp NEOX)."""
    dim = x.shape[-1]
    half = dim // 2
    inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if factors is not None:
        inv_freq = inv_freq / factors.astype(np.float64)
    angles = (positions.astype(np.float64) * scale)[:, None] * inv_freq[None, :]  # [n, D/2]
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (ggml_gelu, HF `gelu_pytorch_tanh`)."""
    inner = np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [n, in] times weight [out, in] transposed. Written W @ x.T: OpenBLAS runs small-n batches of this
    shape 2-3x faster than x @ W.T."""
    return (weight @ x.T).T


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))
