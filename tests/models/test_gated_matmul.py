"""The gate_up projection fused with its gated activation (models/kernels/gated_matmul.py): for every integer
block type (the generic kernels) and Q4_1 / Q8_0 in the tuned layout, the fused GEMV and GEMM equal the plain
kernel followed by the activation kernel (norm_act_cpu) bit for bit, and so the NumPy twins
(reference_blocks.reference_matmul, then reference_quant.kernel_silu_mul / kernel_gelu_mul)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf")
tvm = pytest.importorskip("tvm")

from shoal.models.kernels.blocks import KINDS, pack_blocks  # noqa: E402
from shoal.models.kernels.gated_matmul import (  # noqa: E402
    gated_blocks,
    gemm_gated_func,
    gemv_gated_func,
    qgemm_gated_func,
    qgemv_gated_func,
)
from shoal.models.kernels.gated_quant import gemm_gated_quant_func, qgemm_gated_quant_func  # noqa: E402
from shoal.models.kernels.gemm_q4 import gemm_func  # noqa: E402
from shoal.models.kernels.gemv_q4 import gemv_func, quantize_act_func  # noqa: E402
from shoal.models.kernels.norm_act_cpu import gelu_mul_func, silu_mul_func  # noqa: E402
from shoal.models.kernels.qmatmul import qgemm_func, quantize_act_sums_func  # noqa: E402
from shoal.models.kernels.reference_blocks import reference_matmul  # noqa: E402
from shoal.models.reference_quant import kernel_gelu_mul, kernel_silu_mul  # noqa: E402

from tests.models.kernel_helpers import (  # noqa: E402
    DEV,
    HOST_VNNI,
    NATIVE,
    PORTABLE,
    activations,
    build,
    random_q4_1,
    random_q8_0,
)
from tests.models.test_block_kernels import HOST, ISA, random_raw  # noqa: E402

N, K = 128, 512  # gate_up rows 2F = 128: four gate blocks (two activation groups), four up blocks
F = N // 2
ACTS = {"silu": (silu_mul_func, kernel_silu_mul), "gelu_tanh": (gelu_mul_func, kernel_gelu_mul)}
ROWS_CASES = (1, 3, 37)  # GEMV (≤ 8 rows) and a GEMM past one 32-row chunk with a partial tile


def _t(a: np.ndarray) -> tvm.runtime.Tensor:
    return tvm.runtime.tensor(np.ascontiguousarray(a), DEV)


def _zeros(rows: int, width: int) -> tvm.runtime.Tensor:
    return _t(np.zeros((rows, width), np.float32))


def _inputs(rows: int) -> np.ndarray:
    x = activations(rows, K, rows + 11)
    x[0, :4] = [0.5, -1.5, 2.5, 127.0]  # exact halves after scaling: the rounding mode matters
    return x


OUTS = ("sums", "scaled")
"""The quantizing gated GEMM's output formats: the generic down kernels' (qmatmul) and the tuned ones'."""


def _quantizers() -> dict:
    return {"quantize_sums": quantize_act_sums_func(F), "quantize_scaled": quantize_act_func(F)}


def _check_quantized(lib: tvm.runtime.Module, act: str, acts: list, arrays: list, gated: np.ndarray) -> None:
    """The quantizing gated GEMM (gated_quant.py) writes what the quantization kernel makes of the gated
    output: xq, xd and xs (sums) or xds (scaled), bit for bit."""
    rows = gated.shape[0]
    for out in OUTS:
        third = ((rows, F // 16), np.int32) if out == "sums" else ((rows, F // 32), np.float32)
        shapes = [((rows, F // 4), np.int32), ((rows, F // 32), np.float32), third]
        want, got = ([_t(np.zeros(s, dt)) for s, dt in shapes] for _ in range(2))
        lib[f"quantize_{out}"](_t(gated), *want)
        lib[f"quant_{act}_{out}"](*acts, *arrays, *got)
        for name, w, g in zip(("xq", "xd", "x3"), want, got, strict=True):
            np.testing.assert_array_equal(g.numpy(), w.numpy(), err_msg=f"{act} {out} {name} {rows} rows")


def _acts_for(kind: str) -> tuple[str, ...]:
    """SiLU for every kind; GELU (the same kernels but their activation expression) for Q4_K."""
    return tuple(ACTS) if kind == "q4_k" else ("silu",)


def _act_funcs() -> dict:
    """The plain activation kernels, built beside the fused ones (the same target: the same contractions)."""
    return {f"plain_{name}": factory(F) for name, (factory, _) in ACTS.items()}


def _activate(lib: tvm.runtime.Module, name: str, plain: np.ndarray) -> np.ndarray:
    y = _zeros(plain.shape[0], F)
    lib[f"plain_{name}"](_t(plain), y)
    return y.numpy()


DEFAULT_KINDS = ("q4_k", "q6_k")
"""The default suite's generic kinds (the K-quants' affine path and Q6_K's halves, the Q4_K_M files' types);
the other integer kinds (symmetric, affine with a min, 5- and 8-bit codes) under -m slow."""


@pytest.mark.parametrize("kind", [k if k in DEFAULT_KINDS else pytest.param(k, marks=pytest.mark.slow)
                                  for k, s in KINDS.items() if not s.is_float])
def test_generic_gated_kernels_equal_matmul_then_activation(kind: str) -> None:
    w = pack_blocks(kind, random_raw(kind, N, K, 21), N, K)
    funcs = {"gemm": qgemm_func(kind, N, K, ISA), "quantize": quantize_act_sums_func(K)} | _quantizers()
    acts_tested = _acts_for(kind)
    for act in acts_tested:
        funcs[f"gemv_{act}"] = qgemv_gated_func(kind, N, K, ISA, act)
        funcs[f"gemm_{act}"] = qgemm_gated_func(kind, N, K, ISA, act)
        for out in OUTS:
            funcs[f"quant_{act}_{out}"] = qgemm_gated_quant_func(kind, N, K, ISA, act, out)
    lib = build(funcs | _act_funcs(), HOST)
    arrays = [_t(a) for _, a in w.arrays]
    for rows in ROWS_CASES:
        x = _inputs(rows)
        acts = [_t(np.zeros(s, dt)) for s, dt in (((rows, K // 4), np.int32), ((rows, K // 32), np.float32),
                                                  ((rows, K // 16), np.int32))]
        lib["quantize"](_t(x), *acts)
        plain = _zeros(rows, N)
        lib["gemm"](*acts, *arrays, plain)
        np.testing.assert_array_equal(plain.numpy(), reference_matmul(x, w))
        for act in acts_tested:
            model = ACTS[act][1]
            want = _activate(lib, act, plain.numpy())
            if HOST is not PORTABLE:  # the NumPy models assume FMA contraction
                np.testing.assert_array_equal(want, model(plain.numpy()[:, :F], plain.numpy()[:, F:]))
            y = _zeros(rows, F)
            lib[f"gemm_{act}"](*acts, *arrays, y)
            np.testing.assert_array_equal(y.numpy(), want, err_msg=f"gemm {act} {rows} rows")
            _check_quantized(lib, act, acts, arrays, want)
            if rows <= 8:
                y = _zeros(rows, F)
                lib[f"gemv_{act}"](_t(x), *arrays, y)
                np.testing.assert_array_equal(y.numpy(), want, err_msg=f"gemv {act} {rows} rows")


TUNED = [("q4_1", False), pytest.param("q8_0", False, marks=pytest.mark.slow)] + (
    [("q4_1", True), ("q8_0", True)] if HOST_VNNI else [])


@pytest.mark.parametrize(("kind", "vnni"), TUNED)
def test_tuned_gated_kernels_equal_matmul_then_activation(kind: str, vnni: bool) -> None:
    """Q4_1 / Q8_0 in quant.py's layout (the x86_vnni and portable backends' kernels; AVX2 runs the generic
    ones): the portable dot products here, VNNI's too where this CPU has it."""
    w = (random_q4_1 if kind == "q4_1" else random_q8_0)(N, K, 22)
    funcs = {"gemv": gemv_func(kind, N, K, vnni, fused=True), "gemm": gemm_func(kind, N, K, vnni),
             "quantize": quantize_act_func(K)} | _quantizers()
    acts_tested = _acts_for(kind)
    for act in acts_tested:
        funcs[f"gemv_{act}"] = gemv_gated_func(kind, N, K, vnni, act)
        funcs[f"gemm_{act}"] = gemm_gated_func(kind, N, K, vnni, act)
        for out in OUTS:
            funcs[f"quant_{act}_{out}"] = gemm_gated_quant_func(kind, N, K, vnni, act, out)
    lib = build(funcs | _act_funcs(), NATIVE if vnni else PORTABLE)
    arrays = [_t(a) for a in w.arrays()]
    for rows in ROWS_CASES:
        x = _inputs(rows)
        acts = [_t(np.zeros(s, dt)) for s, dt in (((rows, K // 4), np.int32), ((rows, K // 32), np.float32),
                                                  ((rows, K // 32), np.float32))]
        lib["quantize"](_t(x), *acts)
        plain = _zeros(rows, N)
        lib["gemm"](*acts, *arrays, plain)
        for act in acts_tested:
            want = _activate(lib, act, plain.numpy())
            y = _zeros(rows, F)
            lib[f"gemm_{act}"](*acts, *arrays, y)
            np.testing.assert_array_equal(y.numpy(), want, err_msg=f"gemm {act} {rows} rows")
            _check_quantized(lib, act, acts, arrays, want)
            if rows <= 8:
                y, single = _zeros(rows, F), _zeros(rows, N)
                lib["gemv"](_t(x), *arrays, single)
                np.testing.assert_array_equal(single.numpy(), plain.numpy())
                lib[f"gemv_{act}"](_t(x), *arrays, y)
                np.testing.assert_array_equal(y.numpy(), want, err_msg=f"gemv {act} {rows} rows")


def test_gated_shapes_and_activations_are_checked() -> None:
    assert gated_blocks(64) == 2
    with pytest.raises(ValueError, match="multiple of 16"):
        gated_blocks(48)  # F = 24
    with pytest.raises(ValueError, match="unknown activation"):
        qgemm_gated_func("q4_0", N, K, ISA, "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        gemv_gated_func("q8_0", N, K, False, "relu")
    with pytest.raises(ValueError, match="multiple of 32"):
        qgemm_gated_quant_func("q4_0", 96, K, ISA, "silu", "sums")  # F = 48
    with pytest.raises(ValueError, match="unknown activation format"):
        gemm_gated_quant_func("q8_0", N, K, False, "silu", "bytes")
