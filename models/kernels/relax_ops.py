"""`tvm.relax.frontend.nn` building blocks over the quantized kernels: `QuantizedLinear` (y = x·Wᵀ with Q4_1
or Q8_0 weights kept packed) and `QuantizedEmbedding` (Q8_0 token embedding that doubles as the tied output
head), the vector RMSNorm and gated activations (`rms_norm_module`, `gated_mul`), plus the loader helpers
that turn GGUF tensors into their parameter arrays.

The kernels are picked per target backend (see `kernel_backend`): "x86_vnni" (AVX-512 VNNI), "x86_avx2"
(AVX2 without VNNI: the generic block-type kernels use `vpmaddubsw`, Q4_1/Q8_0 the portable path), "llvm"
(portable vector code for any other llvm target) or "cuda". Compile modules that use these with
`compile_pipeline(target)` (see docs/kernels.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from shoal.models.kernels.embed_q8 import embedding_func
from shoal.models.kernels.gemm_q4 import gemm_func
from shoal.models.kernels.gemv_q4 import gemv_func, quantize_act_func
from shoal.models.kernels.quant import GROUP, ROWS, PackedWeight, pack_gguf_tensor
from shoal.models.kernels.tir_common import LANES, as_target, has_avx2, has_vnni
from tvm import tirx
from tvm.relax.frontend import nn

BACKENDS = ("x86_vnni", "x86_avx2", "llvm", "cuda")
_WORDS = {"q4_1": 4, "q8_0": 8}


def kernel_backend(target: Any) -> str:
    """The kernel family for a TVM target (dict, string or `tvm.target.Target`)."""
    target = as_target(target)
    if target.kind.name == "cuda":
        return "cuda"
    if target.kind.name != "llvm":
        raise ValueError(f"no quantized kernels for target kind {target.kind.name!r} (llvm and cuda only)")
    if has_vnni(target):
        return "x86_vnni"
    return "x86_avx2" if has_avx2(target) else "llvm"


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: expected one of {BACKENDS}")


def _rows(x: nn.Tensor) -> tirx.PrimExpr | int:
    rows: tirx.PrimExpr | int = 1
    for dim in x.shape[:-1]:
        rows = rows * dim
    return rows


DECODE_MAX_ROWS = 8


def _is_decode(x: nn.Tensor) -> bool:
    """GEMV for one token per sequence ([batch, 1, K]) or a static handful of rows; GEMM otherwise."""
    if len(x.shape) >= 3 and isinstance(x.shape[-2], int) and x.shape[-2] == 1:
        return True
    rows = _rows(x)
    return isinstance(rows, int) and rows <= DECODE_MAX_ROWS


def quantized_matmul(x: nn.Tensor, kind: str, out_features: int, weights: list[nn.Tensor],
                     backend: str) -> nn.Tensor:
    """y [..., N] = x [..., K] · Wᵀ for packed weights `weights` (qweight, scale[, min])."""
    if backend == "x86_avx2":  # the generic kernels' AVX2 path reads the same arrays (blocks.py)
        from shoal.models.kernels.relax_blocks import block_matmul

        return block_matmul(x, kind, out_features, weights, backend)
    k = x.shape[-1]
    lead = list(x.shape[:-1])
    rows = _rows(x)
    x2 = nn.op.reshape(x, [rows, k]) if len(x.shape) != 2 else x
    out = nn.Tensor.placeholder([rows, out_features], "float32")
    if backend == "cuda":
        from shoal.models.kernels.cuda_q4 import cuda_matmul_func

        y = nn.op.tensor_ir_op(cuda_matmul_func(kind, out_features, k), f"cuda_{kind}_{out_features}x{k}",
                               [x2, *weights], out)
    elif _is_decode(x):  # one fused call: quantize the few rows, then the parallel GEMV
        func = gemv_func(kind, out_features, k, backend == "x86_vnni", fused=True)
        y = nn.op.tensor_ir_op(func, f"gemv_{kind}_{out_features}x{k}", [x2, *weights], out)
    else:
        groups = k // GROUP
        xq, xd, xds = nn.op.tensor_ir_op(
            quantize_act_func(k), f"quantize_act_{k}", [x2],
            [nn.Tensor.placeholder([rows, k // 4], "int32"), nn.Tensor.placeholder([rows, groups], "float32"),
             nn.Tensor.placeholder([rows, groups], "float32")])
        func = gemm_func(kind, out_features, k, backend == "x86_vnni")
        y = nn.op.tensor_ir_op(func, f"gemm_{kind}_{out_features}x{k}", [xq, xd, xds, *weights], out)
    return nn.op.reshape(y, [*lead, out_features]) if len(x.shape) != 2 else y


class QuantizedLinear(nn.Module):
    """y = x·Wᵀ (no bias) with W [out_features, in_features] stored packed (models/kernels/quant.py).

    Parameters: `qweight` uint32 [N/16, K/32, 4|8, 16], `scale` float16 [N/16, K/32, 16] and, for q4_1,
    `min` float16 [N/16, K/32, 16]. Fill them with `param_arrays(pack_gguf_tensor(t))`."""

    def __init__(self, in_features: int, out_features: int, kind: str = "q4_1", backend: str = "x86_vnni"):
        if kind not in _WORDS:
            raise ValueError(f"unknown weight kind {kind!r}: expected 'q4_1' or 'q8_0'")
        _check_backend(backend)
        if out_features % ROWS or in_features % GROUP:
            raise ValueError(f"QuantizedLinear({in_features}, {out_features}): out_features must be a "
                             f"multiple of {ROWS}, in_features of {GROUP}")
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.backend = kind, backend
        shape = (out_features // ROWS, in_features // GROUP)
        self.qweight = nn.Parameter((*shape, _WORDS[kind], ROWS), "uint32")
        self.scale = nn.Parameter((*shape, ROWS), "float16")
        self.min = nn.Parameter((*shape, ROWS), "float16") if kind == "q4_1" else None

    def weights(self) -> list[nn.Tensor]:
        return [self.qweight, self.scale] + ([self.min] if self.min is not None else [])

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return quantized_matmul(x, self.kind, self.out_features, self.weights(), self.backend)


class QuantizedEmbedding(nn.Module):
    """Token embedding [vocab, dim] stored as packed Q8_0; `project(x)` is the tied output head x·Eᵀ."""

    def __init__(self, vocab_size: int, dim: int, backend: str = "x86_vnni"):
        _check_backend(backend)
        if vocab_size % ROWS or dim % GROUP:
            raise ValueError(f"QuantizedEmbedding({vocab_size}, {dim}): vocab must be a multiple of {ROWS}, "
                             f"dim of {GROUP}")
        self.vocab_size, self.dim, self.backend = vocab_size, dim, backend
        self.qweight = nn.Parameter((vocab_size // ROWS, dim // GROUP, _WORDS["q8_0"], ROWS), "uint32")
        self.scale = nn.Parameter((vocab_size // ROWS, dim // GROUP, ROWS), "float16")

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        """ids int32 [...] -> fp32 [..., dim] (dequantized rows)."""
        count = _rows(nn.Tensor.placeholder([*ids.shape, 1], "int32"))
        flat = nn.op.reshape(ids, [count]) if len(ids.shape) != 1 else ids
        if self.backend == "cuda":
            from shoal.models.kernels.cuda_q4 import cuda_embedding_func

            func = cuda_embedding_func(self.vocab_size, self.dim)
        else:
            func = embedding_func(self.vocab_size, self.dim)
        out = nn.op.tensor_ir_op(func, f"embed_q8_0_{self.vocab_size}x{self.dim}",
                                 [flat, self.qweight, self.scale],
                                 nn.Tensor.placeholder([count, self.dim], "float32"))
        return nn.op.reshape(out, [*ids.shape, self.dim]) if len(ids.shape) != 1 else out

    def project(self, x: nn.Tensor) -> nn.Tensor:
        """Logits x [..., dim] · Eᵀ -> [..., vocab]. Slice prefill to the last token before calling this."""
        return quantized_matmul(x, "q8_0", self.vocab_size, [self.qweight, self.scale], self.backend)


def _flatten(x: nn.Tensor) -> tuple[nn.Tensor, tirx.PrimExpr | int, list]:
    lead = list(x.shape[:-1])
    rows = _rows(x)
    return (nn.op.reshape(x, [rows, x.shape[-1]]) if len(x.shape) != 2 else x), rows, lead


class FastRMSNorm(nn.Module):
    """Drop-in for `nn.RMSNorm(dim, -1, eps, bias=False)` (same `weight` parameter) whose CPU backends use
    the vector kernel of models/kernels/norm_act_cpu.py; on "cuda" it is `nn.op.rms_norm`. `dim` must be a
    multiple of 16 on the CPU backends (`rms_norm_module` falls back to `nn.RMSNorm` otherwise)."""

    def __init__(self, dim: int, eps: float, backend: str = "x86_vnni"):
        _check_backend(backend)
        if backend != "cuda" and dim % LANES:
            raise ValueError(f"FastRMSNorm({dim}): the CPU kernel needs a multiple of {LANES} features")
        self.dim, self.eps, self.backend = dim, eps, backend
        self.weight = nn.Parameter((dim,), "float32")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if self.backend == "cuda":
            return nn.op.rms_norm(x, self.weight, axes=-1, epsilon=self.eps)
        from shoal.models.kernels.norm_act_cpu import rms_norm_func

        flat, rows, lead = _flatten(x)
        y = nn.op.tensor_ir_op(rms_norm_func(self.dim, self.eps), f"rms_norm_{self.dim}", [flat, self.weight],
                               nn.Tensor.placeholder([rows, self.dim], "float32"))
        return nn.op.reshape(y, [*lead, self.dim]) if len(x.shape) != 2 else y


def rms_norm_module(dim: int, eps: float, backend: str | None) -> nn.Module:
    """The RMSNorm over the last axis a build uses: the CPU vector kernel (`FastRMSNorm`) when `backend` is
    a CPU one and `dim` a multiple of 16, else TVM's `nn.RMSNorm` (CUDA, `backend=None`, other widths).
    Both hold one `weight` [dim], so loaders see no difference."""
    if backend is not None and backend != "cuda" and dim % LANES == 0:
        return FastRMSNorm(dim, eps, backend)
    return nn.RMSNorm(dim, -1, eps, bias=False, dtype="float32")


def gated_mul(x: nn.Tensor, activation: str, backend: str | None) -> nn.Tensor:
    """act(gate) · up for x [..., 2F] = concat(gate, up) (a fused gate_up projection) -> [..., F];
    `activation` is "silu" or "gelu_tanh" (models/config.py). CPU backends with F % 16 == 0 run one vector
    kernel (norm_act_cpu.py: no split, no temporaries); CUDA, `backend=None` and other widths keep TVM's
    split + `op.silu` / `op.gelu(approximate="tanh")` · up."""
    from shoal.models.kernels.norm_act_cpu import GATED

    if activation not in GATED:
        raise ValueError(f"unknown activation {activation!r}: expected one of {', '.join(GATED)}")
    width = x.shape[-1] // 2
    if backend is None or backend == "cuda" or not isinstance(width, int) or width % LANES:
        gate, up = nn.op.split(x, 2, axis=-1)
        act = nn.op.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else nn.op.silu(gate)
        return act * up
    _check_backend(backend)
    flat, rows, lead = _flatten(x)
    name = "silu_mul" if activation == "silu" else "gelu_mul"
    y = nn.op.tensor_ir_op(GATED[activation](width), f"{name}_{width}", [flat],
                           nn.Tensor.placeholder([rows, width], "float32"))
    return nn.op.reshape(y, [*lead, width]) if len(x.shape) != 2 else y


def silu_mul(x: nn.Tensor, backend: str = "x86_vnni") -> nn.Tensor:
    """silu(gate) · up for x [..., 2F] = concat(gate, up) -> [..., F] (`gated_mul` with SiLU)."""
    _check_backend(backend)
    return gated_mul(x, "silu", backend)


def param_arrays(packed: PackedWeight) -> dict[str, np.ndarray]:
    """Parameter name (within a QuantizedLinear / QuantizedEmbedding) -> array."""
    names = ["qweight", "scale"] + (["min"] if packed.min is not None else [])
    return dict(zip(names, packed.arrays(), strict=True))


def load_gguf_tensor(tensor: Any) -> dict[str, np.ndarray]:
    """A GGUF Q4_1 / Q8_0 tensor (from `gguf.GGUFReader(path).tensors`) -> its parameter arrays."""
    return param_arrays(pack_gguf_tensor(tensor))


def compile_pipeline(target: Any) -> Any:
    """The Relax pipeline for modules using these ops (see docs/kernels.md for why it is not the default)."""
    from shoal.models.kernels.pipeline import kernel_pipeline

    return kernel_pipeline(as_target(target))

