"""`tvm.relax.frontend.nn` modules over every GGUF block type (models/kernels/blocks.py): a linear layer and a
token embedding (with its tied output head) whose weights stay in their GGUF block type, and a linear layer
made of row parts of different types (a Q4_K_M file's attn_q/attn_k Q4_K beside attn_v Q6_K), and the MLP's
gate_up projection fused with its gated activation (`gated_projection`, kernels in gated_matmul.py) and,
in prefill, with the down projection's activation quantization (`gated_mlp`, gated_quant.py).

Q4_1 and Q8_0 use the tuned kernels (relax_ops.QuantizedLinear / QuantizedEmbedding: parameters qweight,
scale[, min]); the other types the generic ones (qmatmul.py, fmatmul.py, embed_any.py: parameters qweight
and blocks.py's per-type arrays, or `weight` for F16/BF16). CPU backends only ("x86_vnni", "x86_avx2",
"llvm").
"""

from __future__ import annotations

from shoal.models.kernels.blocks import GROUP, ROWS, TUNED_KINDS, block_kind, check_shape
from shoal.models.kernels.embed_any import embed_func
from shoal.models.kernels.fmatmul import fmatmul_func
from shoal.models.kernels.gated_matmul import (
    gemm_gated_func,
    gemv_gated_func,
    qgemm_gated_func,
    qgemv_gated_func,
)
from shoal.models.kernels.gated_quant import gemm_gated_quant_func, qgemm_gated_quant_func
from shoal.models.kernels.gemm_q4 import gemm_func
from shoal.models.kernels.gemv_q4 import quantize_act_func
from shoal.models.kernels.qmatmul import (
    param_shapes,
    qgemm_func,
    qgemv_func,
    quantize_act_sums_func,
    qweight_shape,
)
from shoal.models.kernels.relax_ops import (
    QuantizedEmbedding,
    QuantizedLinear,
    _is_decode,
    _rows,
    gated_mul,
    quantized_matmul,
)
from tvm import tirx
from tvm.relax.frontend import nn

CPU_BACKENDS = ("x86_vnni", "x86_avx2", "llvm")
ISA = {"x86_vnni": "vnni", "x86_avx2": "avx2", "llvm": "portable"}


def _check_cpu(kind: str, backend: str) -> None:
    if backend not in CPU_BACKENDS:
        raise ValueError(f"{kind} weights have CPU kernels only (backend {backend!r}; expected one of "
                         f"{CPU_BACKENDS})")


def _parameters(module: nn.Module, kind: str, n: int, k: int) -> tuple[str, ...]:
    """Create the kind's parameters on `module` (names as blocks.pack_decoded); return the names in order."""
    check_shape(kind, n, k)
    if block_kind(kind).is_float:
        module.weight = nn.Parameter((n // ROWS, k, ROWS), "uint16")
        return ("weight",)
    module.qweight = nn.Parameter(qweight_shape(kind, n, k), "uint32")
    for name, shape, dtype in param_shapes(kind, n, k):
        setattr(module, name, nn.Parameter(shape, dtype))
    return ("qweight", *(name for name, _, _ in param_shapes(kind, n, k)))


def block_matmul(x: nn.Tensor, kind: str, out_features: int, weights: list[nn.Tensor],
                 backend: str) -> nn.Tensor:
    """y [..., N] = x [..., K] · Wᵀ for W of a generic block type (its packed parameters `weights`)."""
    k = x.shape[-1]
    lead = list(x.shape[:-1])
    rows = _rows(x)
    x2 = nn.op.reshape(x, [rows, k]) if len(x.shape) != 2 else x
    out = nn.Tensor.placeholder([rows, out_features], "float32")
    name = f"{kind}_{out_features}x{k}"
    if block_kind(kind).is_float:
        y = nn.op.tensor_ir_op(fmatmul_func(kind, out_features, k), f"fmatmul_{name}", [x2, *weights], out)
    elif _is_decode(x):
        func = qgemv_func(kind, out_features, k, ISA[backend])
        y = nn.op.tensor_ir_op(func, f"gemv_{name}", [x2, *weights], out)
    else:
        groups = k // GROUP
        xq, xd, xs = nn.op.tensor_ir_op(
            quantize_act_sums_func(k), f"quantize_act_sums_{k}", [x2],
            [nn.Tensor.placeholder([rows, k // 4], "int32"), nn.Tensor.placeholder([rows, groups], "float32"),
             nn.Tensor.placeholder([rows, 2 * groups], "int32")])
        func = qgemm_func(kind, out_features, k, ISA[backend])
        y = nn.op.tensor_ir_op(func, f"gemm_{name}", [xq, xd, xs, *weights], out)
    return nn.op.reshape(y, [*lead, out_features]) if len(x.shape) != 2 else y


def _quantized_acts(x2: nn.Tensor, rows: tirx.PrimExpr | int, k: int, generic: bool) -> list[nn.Tensor]:
    """x [rows, K] quantized for a prefill GEMM: (xq, xd, xs) for the generic kernels, (xq, xd, xds) for the
    tuned Q4_1 / Q8_0 ones."""
    groups = k // GROUP
    third = ([rows, 2 * groups], "int32") if generic else ([rows, groups], "float32")
    func = quantize_act_sums_func(k) if generic else quantize_act_func(k)
    name = f"quantize_act_sums_{k}" if generic else f"quantize_act_{k}"
    return list(nn.op.tensor_ir_op(
        func, name, [x2],
        [nn.Tensor.placeholder([rows, k // 4], "int32"), nn.Tensor.placeholder([rows, groups], "float32"),
         nn.Tensor.placeholder(*third)]))


def _fusable(linear: nn.Module, backend: str | None) -> bool:
    """Whether `gated_projection` runs `linear` fused with the activation: one integer block type (generic or
    tuned) on a CPU backend, F = out / 2 a multiple of 16."""
    if backend not in CPU_BACKENDS or getattr(linear, "out_features", 1) % (2 * ROWS):
        return False
    if isinstance(linear, QuantizedLinear):
        return linear.backend == backend
    return isinstance(linear, BlockLinear) and not block_kind(linear.kind).is_float


def gated_projection(linear: nn.Module, x: nn.Tensor, activation: str, backend: str | None) -> nn.Tensor:
    """act(gate) · up of the MLP's gate_up projection `linear` (W [2F, K]: gate rows, then up rows) on x
    [..., K] -> [..., F]: one fused kernel (gated_matmul.py; no [..., 2F] fp32 output) where `linear` holds
    one integer block type on a CPU backend, else `gated_mul(linear(x), ...)` (F16/BF16, mixed-type parts,
    CUDA, TVM's ops). Both give the same values bit for bit."""
    if not _fusable(linear, backend):
        return gated_mul(linear(x), activation, backend)
    from shoal.models.kernels.norm_act_cpu import GATED

    if activation not in GATED:
        raise ValueError(f"unknown activation {activation!r}: expected one of {', '.join(GATED)}")
    n, k = linear.out_features, x.shape[-1]
    lead, rows = list(x.shape[:-1]), _rows(x)
    x2 = nn.op.reshape(x, [rows, k]) if len(x.shape) != 2 else x
    out = nn.Tensor.placeholder([rows, n // 2], "float32")
    kind, weights = _kind_weights(linear)
    generic = isinstance(linear, BlockLinear) or backend == "x86_avx2"  # AVX2 runs Q4_1/Q8_0 generically too
    name = f"{kind}_{n}x{k}_{activation}"
    if _is_decode(x):
        func = (qgemv_gated_func(kind, n, k, ISA[backend], activation) if generic
                else gemv_gated_func(kind, n, k, backend == "x86_vnni", activation))
        y = nn.op.tensor_ir_op(func, f"gemv_gated_{name}", [x2, *weights], out)
    else:
        func = (qgemm_gated_func(kind, n, k, ISA[backend], activation) if generic
                else gemm_gated_func(kind, n, k, backend == "x86_vnni", activation))
        y = nn.op.tensor_ir_op(func, f"gemm_gated_{name}", [*_quantized_acts(x2, rows, k, generic), *weights],
                               out)
    return nn.op.reshape(y, [*lead, n // 2]) if len(x.shape) != 2 else y


def _kind_weights(linear: nn.Module) -> tuple[str, list[nn.Tensor]]:
    if isinstance(linear, QuantizedLinear):
        return linear.kind, linear.weights()
    return linear.kind, [getattr(linear, name) for name in linear.param_names]


def _down_format(down: nn.Module, backend: str | None) -> str | None:
    """The activation format the down projection's prefill GEMM reads ("sums": qmatmul's, "scaled":
    gemm_q4's), or None where it takes fp32 (F16/BF16, CUDA, TVM's ops)."""
    if backend not in CPU_BACKENDS:
        return None
    if isinstance(down, QuantizedLinear) and down.backend == backend:
        return "sums" if backend == "x86_avx2" else "scaled"
    if isinstance(down, BlockLinear) and not block_kind(down.kind).is_float:
        return "sums"
    return None


def gated_mlp(gate_up: nn.Module, down: nn.Module, x: nn.Tensor, activation: str,
              backend: str | None) -> nn.Tensor:
    """down(act(gate) · up) of an MLP on x [..., K]. In prefill, where both projections hold integer block
    types on a CPU backend and F % 32 == 0, the gate_up GEMM writes the down GEMM's quantized activations
    itself (gated_quant.py: neither the [..., 2F] projection nor the [..., F] fp32 product is made); decode
    and the other cases run `down(gated_projection(...))`. The same values bit for bit either way."""
    fmt = _down_format(down, backend) if _fusable(gate_up, backend) else None
    if fmt is None or _is_decode(x) or gate_up.out_features % (4 * ROWS):
        return down(gated_projection(gate_up, x, activation, backend))
    from shoal.models.kernels.norm_act_cpu import GATED

    if activation not in GATED:
        raise ValueError(f"unknown activation {activation!r}: expected one of {', '.join(GATED)}")
    n, k = gate_up.out_features, x.shape[-1]
    f, hidden = n // 2, down.out_features
    lead, rows = list(x.shape[:-1]), _rows(x)
    x2 = nn.op.reshape(x, [rows, k]) if len(x.shape) != 2 else x
    kind, weights = _kind_weights(gate_up)
    generic = isinstance(gate_up, BlockLinear) or backend == "x86_avx2"
    func = (qgemm_gated_quant_func(kind, n, k, ISA[backend], activation, fmt) if generic
            else gemm_gated_quant_func(kind, n, k, backend == "x86_vnni", activation, fmt))
    third = ([rows, f // 16], "int32") if fmt == "sums" else ([rows, f // GROUP], "float32")
    acts = nn.op.tensor_ir_op(
        func, f"gemm_gated_quant_{kind}_{n}x{k}_{activation}_{fmt}",
        [*_quantized_acts(x2, rows, k, generic), *weights],
        [nn.Tensor.placeholder([rows, f // 4], "int32"), nn.Tensor.placeholder([rows, f // GROUP], "float32"),
         nn.Tensor.placeholder(*third)])
    down_kind, down_weights = _kind_weights(down)
    down_func = (qgemm_func(down_kind, hidden, f, ISA[backend]) if fmt == "sums"
                 else gemm_func(down_kind, hidden, f, backend == "x86_vnni"))
    y = nn.op.tensor_ir_op(down_func, f"gemm_{down_kind}_{hidden}x{f}", [*acts, *down_weights],
                           nn.Tensor.placeholder([rows, hidden], "float32"))
    return nn.op.reshape(y, [*lead, hidden]) if len(x.shape) != 2 else y


class BlockLinear(nn.Module):
    """y = x·Wᵀ (no bias), W [out_features, in_features] kept in GGUF block type `kind` (not Q4_1/Q8_0:
    `make_block_linear` picks QuantizedLinear for those)."""

    def __init__(self, in_features: int, out_features: int, kind: str, backend: str = "x86_vnni"):
        if kind in TUNED_KINDS:
            raise ValueError(f"{kind} weights use QuantizedLinear (make_block_linear picks it)")
        _check_cpu(kind, backend)
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.backend = kind, backend
        self.param_names = _parameters(self, kind, out_features, in_features)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        weights = [getattr(self, name) for name in self.param_names]
        return block_matmul(x, self.kind, self.out_features, weights, self.backend)


def make_block_linear(in_features: int, out_features: int, kind: str, backend: str) -> nn.Module:
    """The linear layer for one GGUF block type: QuantizedLinear for Q4_1 / Q8_0, else BlockLinear."""
    if kind in TUNED_KINDS:
        return QuantizedLinear(in_features, out_features, kind, backend)
    return BlockLinear(in_features, out_features, kind, backend)


class MixedLinear(nn.Module):
    """Row parts of different block types side by side: y = concat(part_i(x)) along the last axis (a fused
    qkv or gate_up whose GGUF tensors differ in type). Parameters under `parts.<i>.`."""

    def __init__(self, in_features: int, parts: list[tuple[str, int]], backend: str = "x86_vnni"):
        if len(parts) < 2:
            raise ValueError("MixedLinear needs at least two parts; use make_block_linear for one")
        self.in_features = in_features
        self.out_features = sum(rows for _, rows in parts)
        self.parts = nn.ModuleList([make_block_linear(in_features, rows, kind, backend)
                                    for kind, rows in parts])

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.concat([part(x) for part in self.parts], dim=-1)


class BlockEmbedding(nn.Module):
    """Token embedding [vocab, dim] kept in GGUF block type `kind` (not Q8_0: `make_block_embedding` picks
    QuantizedEmbedding for that); `project(x)` is the tied output head x·Eᵀ over the same arrays."""

    def __init__(self, vocab_size: int, dim: int, kind: str, backend: str = "x86_vnni"):
        _check_cpu(kind, backend)
        self.vocab_size, self.dim, self.kind, self.backend = vocab_size, dim, kind, backend
        self.param_names = _parameters(self, kind, vocab_size, dim)

    def weights(self) -> list[nn.Tensor]:
        return [getattr(self, name) for name in self.param_names]

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        """ids int32 [...] -> fp32 [..., dim] (dequantized rows)."""
        count = _rows(nn.Tensor.placeholder([*ids.shape, 1], "int32"))
        flat = nn.op.reshape(ids, [count]) if len(ids.shape) != 1 else ids
        out = nn.op.tensor_ir_op(embed_func(self.kind, self.vocab_size, self.dim),
                                 f"embed_{self.kind}_{self.vocab_size}x{self.dim}", [flat, *self.weights()],
                                 nn.Tensor.placeholder([count, self.dim], "float32"))
        return nn.op.reshape(out, [*ids.shape, self.dim]) if len(ids.shape) != 1 else out

    def project(self, x: nn.Tensor) -> nn.Tensor:
        """Logits x [..., dim] · Eᵀ -> [..., vocab]. Slice prefill to the last token before calling this."""
        if self.kind == "q4_1":  # blocks.py's q4_1 arrays are quant.py's (qweight, scale, min)
            return quantized_matmul(x, "q4_1", self.vocab_size, self.weights(), self.backend)
        return block_matmul(x, self.kind, self.vocab_size, self.weights(), self.backend)


def make_block_embedding(vocab_size: int, dim: int, kind: str, backend: str) -> nn.Module:
    if kind == "q8_0":
        return QuantizedEmbedding(vocab_size, dim, backend)
    return BlockEmbedding(vocab_size, dim, kind, backend)
