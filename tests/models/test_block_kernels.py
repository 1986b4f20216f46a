"""Every GGUF block type in compiled kernels (models/kernels/blocks.py, qmatmul.py, fmatmul.py, embed_any.py):
the decoder agrees with gguf's own dequantize, the repack round-trips, and the compiled GEMV / GEMM /
embedding agree bit for bit with the NumPy twin (models/kernels/reference_blocks.py)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tvm = pytest.importorskip("tvm")

from shoal.models.kernels.blocks import (  # noqa: E402
    KINDS,
    check_shape,
    concat_tensors,
    decode_blocks,
    dequantize_decoded,
    pack_blocks,
    unpack,
)
from shoal.models.kernels.embed_any import embed_func  # noqa: E402
from shoal.models.kernels.fmatmul import fmatmul_func  # noqa: E402
from shoal.models.kernels.qmatmul import qgemm_func, qgemv_func, quantize_act_sums_func  # noqa: E402
from shoal.models.kernels.quant import quantize_activations  # noqa: E402
from shoal.models.kernels.reference_blocks import (  # noqa: E402
    activation_sums,
    reference_embedding,
    reference_matmul,
)
from shoal.models.kernels.tir_common import host_has_avx2  # noqa: E402

from tests.models.kernel_helpers import DEV, HOST_VNNI, NATIVE, activations, build, rel_err  # noqa: E402

N, K = 64, 512
ISA = "vnni" if HOST_VNNI else ("avx2" if host_has_avx2() else "portable")
HOST = NATIVE if HOST_VNNI or not host_has_avx2() else {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
"""The instruction set the integer kernels are tested with here, and a target that has it."""
SCALES = {  # (byte offset of an fp16 field, low, high) per kind: realistic magnitudes, finite values
    "q4_0": [(0, 0.001, 0.02)], "q8_0": [(0, 0.001, 0.01)], "q5_0": [(0, 0.001, 0.02)],
    "q4_1": [(0, 0.001, 0.02), (2, -0.2, 0.0)], "q5_1": [(0, 0.001, 0.02), (2, -0.2, 0.0)],
    "q4_k": [(0, 0.0001, 0.002), (2, 0.0001, 0.002)], "q5_k": [(0, 0.0001, 0.002), (2, 0.0001, 0.002)],
    "q6_k": [(208, 0.0001, 0.001)],
}


def random_raw(kind: str, n: int, k: int, seed: int) -> np.ndarray:
    """GGUF blocks of a [n, k] tensor: random codes and K-quant scale bytes, fp16 scales in range."""
    spec, rng = KINDS[kind], np.random.default_rng(seed)
    values = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    if kind == "f16":
        return values.astype(np.float16).view(np.uint8)
    if kind == "bf16":
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, (n, k // spec.block, spec.block_bytes), dtype=np.uint8)
    for at, lo, hi in SCALES[kind]:
        scale = rng.uniform(lo, hi, (n, k // spec.block, 1)).astype(np.float16)
        blocks[:, :, at:at + 2] = scale.view(np.uint8)
    return blocks


def gguf_dequantize(kind: str, raw: np.ndarray, n: int, k: int) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    return gguf.quants.dequantize(raw.reshape(n, -1), qtype).reshape(n, k).astype(np.float32)


@pytest.mark.parametrize("kind", list(KINDS))
def test_decoder_matches_gguf_and_repack_round_trips(kind: str) -> None:
    raw = random_raw(kind, N, K, 1)
    dec = decode_blocks(kind, raw, N, K)
    np.testing.assert_array_equal(dequantize_decoded(kind, dec), gguf_dequantize(kind, raw, N, K))
    back = unpack(pack_blocks(kind, raw, N, K))
    np.testing.assert_array_equal(back.codes, dec.codes)
    for name, array in dec.params.items():
        np.testing.assert_array_equal(back.params[name], array)


def test_packed_sizes_match_the_gguf() -> None:
    for kind, spec in KINDS.items():
        packed = pack_blocks(kind, random_raw(kind, N, K, 2), N, K)
        gguf_bytes = N * K // spec.block * spec.block_bytes
        extra = N * K // 256 * 4 if spec.k_quant and kind != "q6_k" else 0  # 6-bit scales/mins as bytes
        assert packed.nbytes == gguf_bytes + extra, kind


@pytest.mark.parametrize("kind", list(KINDS))
def test_packing_in_row_chunks_equals_packing_at_once(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.models.kernels import blocks

    raw = random_raw(kind, 80, K, 7)
    whole = blocks.pack_decoded(kind, decode_blocks(kind, raw, 80, K))
    monkeypatch.setattr(blocks, "PACK_WEIGHTS", 32 * K)  # chunks of 32 rows: 32, 32, 16
    chunked = pack_blocks(kind, raw, 80, K)
    assert [name for name, _ in chunked.arrays] == [name for name, _ in whole.arrays]
    for (name, got), (_, want) in zip(chunked.arrays, whole.arrays, strict=True):
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_concat_and_shape_checks() -> None:
    a, b = (pack_blocks("q6_k", random_raw("q6_k", 32, 256, s), 32, 256) for s in (3, 4))
    both = concat_tensors([a, b])
    np.testing.assert_array_equal(dequantize_decoded("q6_k", unpack(both)),
                                  np.concatenate([dequantize_decoded("q6_k", unpack(w)) for w in (a, b)]))
    with pytest.raises(ValueError, match="multiple of 256"):
        check_shape("q4_k", 64, 288)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_shape("q4_0", 40, 64)
    with pytest.raises(ValueError, match="expected"):
        decode_blocks("q4_0", np.zeros(10, np.uint8), 16, 32)
    with pytest.raises(ValueError, match="no kernel"):
        check_shape("iq4_nl", 16, 32)


def _t(a: np.ndarray) -> tvm.runtime.Tensor:
    return tvm.runtime.tensor(np.ascontiguousarray(a), DEV)


INTEGER_CASES = [(k, ISA) for k, s in KINDS.items() if not s.is_float]
if ISA != "portable":
    INTEGER_CASES += [("q5_k", "portable"), ("q6_k", "portable")]


@pytest.mark.parametrize(("kind", "isa"), INTEGER_CASES)
def test_integer_kernels_match_the_reference_bit_for_bit(kind: str, isa: str) -> None:
    w = pack_blocks(kind, random_raw(kind, N, K, 5), N, K)
    target = HOST if isa == ISA else NATIVE
    lib = build({"gemv": qgemv_func(kind, N, K, isa), "gemm": qgemm_func(kind, N, K, isa),
                 "quantize": quantize_act_sums_func(K), "embed": embed_func(kind, N, K)}, target)
    arrays = [_t(a) for _, a in w.arrays]
    for rows in (1, 3, 37):
        x = activations(rows, K, rows)
        x[0, :4] = [0.5, -1.5, 2.5, 127.0]  # exact halves after scaling: the rounding mode matters
        want = reference_matmul(x, w)
        assert rel_err(want, x @ dequantize_decoded(kind, unpack(w)).T) < 5e-2  # int8 activations
        if rows <= 8:
            y = _t(np.zeros((rows, N), np.float32))
            lib["gemv"](_t(x), *arrays, y)
            np.testing.assert_array_equal(y.numpy(), want)
        acts = [_t(np.zeros(s, dt)) for s, dt in (((rows, K // 4), np.int32), ((rows, K // 32), np.float32),
                                                  ((rows, K // 16), np.int32))]
        lib["quantize"](_t(x), *acts)
        np.testing.assert_array_equal(acts[2].numpy().reshape(rows, -1, 2),
                                      activation_sums(quantize_activations(x)[0]))
        y = _t(np.zeros((rows, N), np.float32))
        lib["gemm"](*acts, *arrays, y)
        np.testing.assert_array_equal(y.numpy(), want)
    ids = np.array([0, 5, 17, 63, 5], np.int32)
    out = _t(np.zeros((len(ids), K), np.float32))
    lib["embed"](_t(ids), *arrays, out)
    np.testing.assert_array_equal(out.numpy(), reference_embedding(ids, w))


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_float_kernels_match_the_reference_bit_for_bit(kind: str) -> None:
    raw = random_raw(kind, N, K, 6)
    w = pack_blocks(kind, raw, N, K)
    lib = build({"mm": fmatmul_func(kind, N, K), "embed": embed_func(kind, N, K)}, NATIVE)
    for rows in (1, 9):
        x = activations(rows, K, rows)
        y = _t(np.zeros((rows, N), np.float32))
        lib["mm"](_t(x), _t(w.arrays[0][1]), y)
        np.testing.assert_array_equal(y.numpy(), reference_matmul(x, w))
        assert rel_err(y.numpy(), x @ gguf_dequantize(kind, raw, N, K).T) < 1e-5
    ids = np.array([3, 0, 63], np.int32)
    out = _t(np.zeros((3, K), np.float32))
    lib["embed"](_t(ids), _t(w.arrays[0][1]), out)
    np.testing.assert_array_equal(out.numpy(), gguf_dequantize(kind, raw, N, K)[ids])
