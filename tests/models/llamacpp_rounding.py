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
from shoal.models.reference_ops import gelu_tanh
from shoal.models.span import LayerSpan

Q8_K_KINDS = ("q4_k", "q5_k", "q6_k")
Q8_0_KINDS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    n, k = x.shape
    return x.astype(np.float32).reshape(n, k // size, size)


def _q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes [n, k/32, 32], fp32 scale amax/127 [n, k/32, 1]) as ggml's x86 quantize_row_q8_0/q8_1 make them:
    id = 127/amax, codes rounded half to even."""
    b = _blocks(x, 32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return np.rint(b * inv), (amax / np.float32(127)).astype(np.float32)


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def round_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0 (and Q8_1's) activation values: the codes times the scale stored as fp16."""
    codes, scale = _q8_0(x)
    return (codes * _f16(scale)).reshape(x.shape)


def q8_1_sum_error(x: np.ndarray) -> np.ndarray:
    """[n, k/32]: Q8_1's stored block sum fp16(d·Σcodes) minus the fp16(d)·Σcodes that round_q8_0's values
    sum to. llama.cpp's Q4_1/Q5_1 dot adds the weight block's min times the stored sum."""
    codes, scale = _q8_0(x)
    total = codes.sum(axis=2, keepdims=True, dtype=np.float32)
    return (_f16(scale * total) - _f16(scale) * total)[..., 0].astype(np.float64)


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


def ggml_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """ggml_compute_forward_rms_norm_f32 then the weight's ggml_mul: squares in fp32 summed in double, the
    mean and 1/sqrt(mean + eps) in fp32 (one ulp apart from NumPy's fp32 mean at most, enough to move an
    activation code)."""
    x = np.asarray(x, np.float32)
    total = np.square(x).astype(np.float64).sum(axis=-1, keepdims=True)
    mean = (total / x.shape[-1]).astype(np.float32)
    scale = (np.float32(1) / np.sqrt(mean + np.float32(eps))).astype(np.float32)
    return (x * scale) * weight.astype(np.float32)


def ggml_gelu(x: np.ndarray) -> np.ndarray:
    """ggml_vec_gelu_f32 with GGML_GELU_FP16: the input rounded to fp16 looks up a table of fp16 tanh-GELU
    values (x <= -10: 0; x >= 10: x)."""
    x = np.asarray(x, np.float32)
    table = gelu_tanh(x.astype(np.float16).astype(np.float32)).astype(np.float16).astype(np.float32)
    return np.where(x <= -10, np.float32(0), np.where(x >= 10, x, table)).astype(np.float32)


class LlamaCppRounding(ReferenceStage):
    """A ReferenceStage whose matmuls (layers and head, the tied head too) round their input activations as
    llama.cpp's CPU backend does for each weight part's block type; weights exactly dequantized, sums in
    float64."""

    def __init__(self, model: GGUFModel, span: LayerSpan, **kwargs: Any) -> None:
        self._kinds = TensorTypes.from_gguf(model).kinds
        self._model = model
        super().__init__(model, span, **kwargs)

    def _load_head(self, load: Callable[[str], np.ndarray]) -> Any:
        return self._load_matrix(load, [head_tensor_name(self.config)])

    def _load_matrix(self, load: Callable[[str], np.ndarray], names: list[str]) -> Any:
        """[(block type, fp64 weight [out, in], the blocks' mins [out, in/32] for Q4_1/Q5_1 else None)]."""
        return [(self._kinds[name], load(name).astype(np.float64), self._mins(name)) for name in names]

    def _norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return ggml_rms_norm(x, weight, self.config.rms_eps)

    def _gated(self, gate_up: np.ndarray) -> np.ndarray:
        if self.config.activation != "gelu_tanh":
            return super()._gated(gate_up)
        ffn = self.config.intermediate_size
        return ggml_gelu(gate_up[:, :ffn]) * gate_up[:, ffn:]

    def _mins(self, name: str) -> np.ndarray | None:
        kind = self._kinds[name]
        if kind not in ("q4_1", "q5_1"):
            return None
        raw = self._model.raw(name)  # blocks of d (f16), m (f16), ...
        blocks = raw.reshape(raw.shape[0], -1, 20 if kind == "q4_1" else 24)
        return np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float64)

    def _project(self, x: np.ndarray, weight: Any) -> np.ndarray:
        x = np.asarray(x, np.float32)
        outs = []
        for kind, w, mins in weight:
            y = round_activations(kind, x).astype(np.float64) @ w.T
            if mins is not None:
                y += q8_1_sum_error(x) @ mins.T
            outs.append(y)
        return np.concatenate(outs, axis=-1).astype(np.float32)
