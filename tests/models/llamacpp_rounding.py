"""The NumPy reference forward with llama.cpp's activation rounding: before each matmul, llama.cpp's CPU
backend converts the activations to the weight type's `vec_dot_type` — Q8_0 (int8 per 32, fp16 scale) for
Q4_0/Q5_0/Q8_0 weights, Q8_1 (the same codes, plus a fp16 block sum) for Q4_1/Q5_1, Q8_K (int8 per 256,
fp32 scale) for the K-quants, fp16 for F16 and bf16 for BF16 — then takes exact integer (or fp32) dot products
with the stored blocks. `LlamaCppRounding` does the same on the exactly dequantized weights, so it isolates
what llama.cpp's rounding changes: against llama.cpp it agrees to fp32 noise, against the plain fp32
reference (models/reference.py) it differs by that rounding alone (tests/models/test_family_blocks.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from shoal.models.block_types import TensorTypes
from shoal.models.gguf import GGUFModel
from shoal.models.reference import ReferenceStage, head_tensor_name
from shoal.models.span import LayerSpan

Q8_K_KINDS = ("q4_k", "q5_k", "q6_k")
Q8_0_KINDS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    n, k = x.shape
    return x.astype(np.float32).reshape(n, k // size, size)


def round_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's x86 quantize_row_q8_0 (and q8_1's codes): per 32, id = 127/amax, codes rounded half to even,
    the scale amax/127 stored as fp16."""
    b = _blocks(x, 32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    codes = np.rint(b * inv)
    scale = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (codes * scale).reshape(x.shape)


def round_q8_k(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_K_ref: per 256, iscale = -127/max (max: the signed value of largest |x|),
    codes nearest_int (half to even) capped at 127, scale 1/iscale in fp32."""
    b = _blocks(x, 256)
    at = np.abs(b).argmax(axis=2)[..., None]
    signed = np.take_along_axis(b, at, axis=2)
    with np.errstate(divide="ignore"):
        iscale = np.where(signed != 0, np.float32(-127) / signed, np.float32(0)).astype(np.float32)
        scale = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    codes = np.minimum(np.rint(b * iscale), 127)
    return (codes * scale).reshape(x.shape)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_BF16: round to nearest even on the upper 16 bits (finite inputs)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    top = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return top.astype(np.uint32).view(np.float32).reshape(x.shape)


def round_activations(kind: str, x: np.ndarray) -> np.ndarray:
    """x [n, k] as llama.cpp's CPU matmul sees it against a weight of block type `kind`."""
    if kind in Q8_K_KINDS:
        return round_q8_k(x)
    if kind in Q8_0_KINDS:
        return round_q8_0(x)
    if kind == "f16":
        return x.astype(np.float16).astype(np.float32)
    if kind == "bf16":
        return round_bf16(x)
    if kind == "f32":
        return x
    raise ValueError(f"no llama.cpp activation rounding known for block type {kind!r}")


class LlamaCppRounding(ReferenceStage):
    """A ReferenceStage whose matmuls (layers and head, the tied head too) round their input activations as
    llama.cpp's CPU backend does for each weight part's block type; weights exactly dequantized, sums in
    float64."""

    def __init__(self, model: GGUFModel, span: LayerSpan, **kwargs: Any) -> None:
        self._kinds = TensorTypes.from_gguf(model).kinds
        super().__init__(model, span, **kwargs)

    def _load_head(self, load: Callable[[str], np.ndarray]) -> Any:
        return self._load_matrix(load, [head_tensor_name(self.config)])

    def _load_matrix(self, load: Callable[[str], np.ndarray], names: list[str]) -> Any:
        return [(self._kinds[name], load(name).astype(np.float64)) for name in names]

    def _project(self, x: np.ndarray, weight: Any) -> np.ndarray:
        x = np.asarray(x, np.float32)
        outs = [round_activations(kind, x).astype(np.float64) @ w.T for kind, w in weight]
        return np.concatenate(outs, axis=-1).astype(np.float32)
