"""Faster CPU kernels for the rest of a decode step (models/kernels): decode and prefill attention over
TVM's paged KV cache, RoPE, RMSNorm and SiLU·mul — against NumPy and, where it helps, TVM's own kernels."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from shoal.models.kernels.relax_ops import compile_pipeline  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend import nn  # noqa: E402

from tests.models.kernel_helpers import DEV, NATIVE, PORTABLE, activations, build, rel_err  # noqa: E402

# ----------------------------------------------------------------------------- decode attention

def paged_case(lengths: list[int], h_kv: int, h_qo: int, d: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    npages = [(n + 15) // 16 for n in lengths]
    total = sum(npages)
    order = rng.permutation(total + 2).astype(np.int32)[:total]  # scattered pages, two unused
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    last = np.array([n - 16 * (p - 1) for n, p in zip(lengths, npages, strict=True)], np.int32)
    pages = rng.standard_normal((total + 2, 2, h_kv, 16, d)).astype(np.float32)
    q = rng.standard_normal((len(lengths), h_qo, d)).astype(np.float32) * 2
    return {"q": q, "pages": pages, "indptr": indptr, "values": order, "last": last, "lengths": lengths}


def attention_reference(case: dict, h_kv: int, h_qo: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros_like(case["q"])
    lse = np.zeros(case["q"].shape[:2], np.float32)
    for b, n in enumerate(case["lengths"]):
        ids = case["values"][case["indptr"][b]:case["indptr"][b + 1]]
        kv = case["pages"][ids]  # [pages, 2, h_kv, 16, d]
        k = kv[:, 0].transpose(1, 0, 2, 3).reshape(h_kv, -1, kv.shape[-1])[:, :n]
        v = kv[:, 1].transpose(1, 0, 2, 3).reshape(h_kv, -1, kv.shape[-1])[:, :n]
        for h in range(h_qo):
            s = k[h // (h_qo // h_kv)] @ case["q"][b, h] * scale
            p = np.exp(s - s.max())
            out[b, h] = p @ v[h // (h_qo // h_kv)] / p.sum()
            lse[b, h] = (s.max() + np.log(p.sum())) / np.log(2)
    return out, lse


def test_fast_decode_attention_matches_numpy_and_tvms_kernel():
    from shoal.models.kernels.attention_cpu import attention_decode_cpu, fast_cpu_attention
    from tvm.relax.frontend.nn.llm import kv_cache

    h_kv, h_qo, d, scale = 3, 9, 64, 0.125
    case = paged_case([37, 16, 1, 200], h_kv, h_qo, d, 5)
    ours = attention_decode_cpu(h_kv, h_qo, d, "float32", False, {})
    stock = kv_cache._attention_decode_cpu(h_kv, h_qo, d, "float32", False, {})
    lib = build({"ours": ours, "stock": stock.with_attr("global_symbol", "stock")}, NATIVE)
    ref_out, ref_lse = attention_reference(case, h_kv, h_qo, scale)
    b = len(case["lengths"])
    for name in ("ours", "stock"):
        out = tvm.runtime.tensor(np.zeros((b, h_qo, d), np.float32), DEV)
        lse = tvm.runtime.tensor(np.zeros((b, h_qo), np.float32), DEV)
        args = [case["q"], case["pages"], case["indptr"], case["values"], case["last"],
                np.zeros(b, np.int32), np.zeros(b, np.int32)]
        lib[name](*[tvm.runtime.tensor(a, DEV) for a in args], out, lse, 0, 1.0, 1e4, scale)
        np.testing.assert_allclose(out.numpy(), ref_out, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-5, atol=1e-4, err_msg=name)
    with fast_cpu_attention():
        assert kv_cache._attention_decode_cpu is attention_decode_cpu
    assert kv_cache._attention_decode_cpu is not attention_decode_cpu


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fast_sliding_window_decode_attention_matches_numpy_and_tvms_kernel(dtype: str):
    """The sliding-window variant (gemma3's local layers): visible keys are the first `sink` stored
    positions, then stored positions from the window offset on, looked up through scattered pages. float16:
    the quantized builds' KV cache (Q, pages and output fp16; the reference sees the same rounded inputs,
    and the output is rounded once: |out| < 4 here, so within 2^-10)."""
    from shoal.models.kernels.attention_cpu import attention_decode_cpu
    from tvm.relax.frontend.nn.llm import kv_cache

    h_kv, h_qo, d, scale = 1, 4, 256, 0.0625
    stored = [37, 16, 1, 200, 530]
    offsets, sinks = [5, 0, 0, 72, 18], [0, 0, 0, 4, 0]  # window offset inside the stored positions
    case = paged_case(stored, h_kv, h_qo, d, 6)
    for key in ("q", "pages"):
        case[key] = case[key].astype(dtype).astype(np.float32)
    atol = 2e-5 if dtype == "float32" else 2 ** -10
    info = np.stack([case["last"], np.array(offsets, np.int32), np.array(sinks, np.int32)])
    visible = [list(range(k)) + list(range(o, n)) for n, o, k in zip(stored, offsets, sinks, strict=True)]
    ref_out = np.zeros_like(case["q"])
    ref_lse = np.zeros(case["q"].shape[:2], np.float32)
    for b, positions in enumerate(visible):
        ids = case["values"][case["indptr"][b]:case["indptr"][b + 1]]
        kv = case["pages"][ids].transpose(1, 2, 0, 3, 4).reshape(2, h_kv, -1, d)[:, :, positions]
        for h in range(h_qo):
            sc = kv[0, h // (h_qo // h_kv)] @ case["q"][b, h] * scale
            p = np.exp(sc - sc.max())
            ref_out[b, h] = p @ kv[1, h // (h_qo // h_kv)] / p.sum()
            ref_lse[b, h] = (sc.max() + np.log(p.sum())) / np.log(2)
    ours = attention_decode_cpu(h_kv, h_qo, d, dtype, True, {})
    stock = kv_cache._attention_decode_cpu(h_kv, h_qo, d, dtype, True, {})
    lib = build({"ours": ours, "stock": stock.with_attr("global_symbol", "stock")}, NATIVE)
    b = len(stored)
    assert np.abs(ref_out).max() < 4
    for name in ("ours", "stock"):
        out = tvm.runtime.tensor(np.zeros((b, h_qo, d), dtype), DEV)
        lse = tvm.runtime.tensor(np.zeros((b, h_qo), np.float32), DEV)
        args = [case["q"].astype(dtype), case["pages"].astype(dtype), case["indptr"], case["values"], info,
                np.zeros(b, np.int32), np.zeros(b, np.int32)]
        lib[name](*[tvm.runtime.tensor(a, DEV) for a in args], out, lse, 0, 1.0, 1e4, scale)
        np.testing.assert_allclose(out.numpy().astype(np.float32), ref_out, atol=atol, err_msg=name)
        np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-5, atol=1e-4, err_msg=name)


def test_fast_prefill_attention_matches_numpy():
    from shoal.models.kernels.attention_cpu import attention_prefill_ragged_cpu

    h_kv, h_q, d, scale = 3, 9, 64, 0.125
    rng = np.random.default_rng(9)
    lens = [37, 1, 20]
    total = sum(lens)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q = rng.standard_normal((total, h_q, d)).astype(np.float32)
    k = rng.standard_normal((total, h_kv, d)).astype(np.float32)
    v = rng.standard_normal((total, h_kv, d)).astype(np.float32)
    lib = build({"ours": attention_prefill_ragged_cpu(h_kv, h_q, d, d, "float32", {})}, NATIVE)
    for causal in (1, 0):
        ref = np.zeros_like(q)
        for b, n in enumerate(lens):
            sl = slice(indptr[b], indptr[b + 1])
            for h in range(h_q):
                s = q[sl, h] @ k[sl, h // 3].T * scale
                if causal:
                    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
                p = np.exp(s - s.max(axis=1, keepdims=True))
                ref[sl, h] = p @ v[sl, h // 3] / p.sum(axis=1, keepdims=True)
        out = tvm.runtime.tensor(np.zeros_like(q), DEV)
        lse = tvm.runtime.tensor(np.zeros((total, h_q), np.float32), DEV)
        args = [q, indptr, k, v, indptr, np.zeros(total, np.int32), np.zeros(len(lens), np.int32)]
        lib["ours"](*[tvm.runtime.tensor(a, DEV) for a in args], out, lse, causal, 0, 1.0, 1e4, scale)
        np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, err_msg=f"causal={causal}")


def test_fast_rope_matches_tvms_kernel():
    from shoal.models.kernels.rope_cpu import rope_cpu
    from tvm.relax.frontend.nn.llm import kv_cache

    args = (100000.0, 1.0, 64, 9, 3, "float32", {"rope_type": "gptj"})
    lib = build({"ours": rope_cpu(*args), "stock": kv_cache.llama_rope_with_position_map(*args)}, NATIVE)
    rng = np.random.default_rng(4)
    for seq in (1, 19):
        qkv = rng.standard_normal((seq, 15, 64)).astype(np.float32)
        pos = (rng.permutation(3000)[:seq]).astype(np.int32)
        for apply in (1, 0):
            outs = {}
            for name in ("ours", "stock"):
                q, k, v = (tvm.runtime.tensor(np.zeros((seq, h, 64), np.float32), DEV) for h in (9, 3, 3))
                lib[name](tvm.runtime.tensor(qkv, DEV), tvm.runtime.tensor(pos, DEV), q, k, v, apply)
                outs[name] = [a.numpy() for a in (q, k, v)]
            for ours, stock in zip(outs["ours"], outs["stock"], strict=True):
                # angles up to 3000 rad: pos·2^(i·c) vs TVM's pos/θ^(2i/d) differ by ~1e-4 rad there
                np.testing.assert_allclose(ours, stock, atol=1e-3 if apply else 0)
    # position 1 rotates pair 0 by exactly 1 radian
    qkv = np.zeros((1, 15, 64), np.float32)
    qkv[0, 0, 0] = 1.0
    q, k, v = (tvm.runtime.tensor(np.zeros((1, h, 64), np.float32), DEV) for h in (9, 3, 3))
    lib["ours"](tvm.runtime.tensor(qkv, DEV), tvm.runtime.tensor(np.array([1], np.int32), DEV), q, k, v, 1)
    np.testing.assert_allclose(q.numpy()[0, 0, :2], [np.cos(1.0), np.sin(1.0)], rtol=1e-6)


# ----------------------------------------------------------------------------- RMSNorm, SiLU·mul

def test_rms_norm_and_silu_mul_kernels_match_numpy():
    from shoal.models.kernels.norm_act_cpu import rms_norm_func, silu_mul_func

    lib = build({"rms": rms_norm_func(96, 1e-5), "silu": silu_mul_func(64)}, NATIVE)
    rng = np.random.default_rng(0)
    for rows in (1, 3, 40):
        x = (rng.standard_normal((rows, 96)) * 3).astype(np.float32)
        w = rng.standard_normal(96).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros_like(x), DEV)
        lib["rms"](tvm.runtime.tensor(x, DEV), tvm.runtime.tensor(w, DEV), y)
        ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + 1e-5) * w
        assert rel_err(y.numpy(), ref) < 1e-6
        g = (rng.standard_normal((rows, 128)) * 6).astype(np.float32)
        g[0, :3] = [-100.0, 100.0, 0.0]
        y = tvm.runtime.tensor(np.zeros((rows, 64), np.float32), DEV)
        lib["silu"](tvm.runtime.tensor(g, DEV), y)
        gate = g[:, :64].astype(np.float64)
        ref = gate / (1 + np.exp(-gate)) * g[:, 64:]
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


needs_fma = pytest.mark.skipif(NATIVE is PORTABLE, reason="this CPU has no AVX2/FMA: the kernels' fp "
                               "contraction, which the NumPy models assume, is not there")


def _norm_act_lib() -> tvm.runtime.Module:
    from shoal.models.kernels.norm_act_cpu import gelu_mul_func, rms_norm_func, silu_mul_func

    return build({"rms": rms_norm_func(576, 1e-5), "rms_small": rms_norm_func(64, 1e-6),
                  "silu": silu_mul_func(96), "gelu": gelu_mul_func(96)}, NATIVE)


def _gate_up(rows: int, width: int, seed: int) -> np.ndarray:
    """gate (scale 4, plus the saturating and exact edge values) beside up (scale 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 2 * width)).astype(np.float32)
    x[:, :width] *= 4
    x[0, :8] = [0.0, -0.0, 90.0, -90.0, 1e-30, -3.34, 1e4, -1e4]
    return x


@needs_fma
def test_norm_and_gated_kernels_match_their_numpy_models_bit_for_bit():
    """The quantized reference's RMSNorm / SiLU·up / GELU·up (models/reference_quant.py) are the kernels'
    exact arithmetic: 1 row (decode, serial) and 300 rows (prefill, parallel)."""
    from shoal.models.reference_quant import kernel_gelu_mul, kernel_rms_norm, kernel_silu_mul

    lib = _norm_act_lib()
    rng = np.random.default_rng(3)
    for rows in (1, 300):
        for name, dim, eps in (("rms", 576, 1e-5), ("rms_small", 64, 1e-6)):
            x = (rng.standard_normal((rows, dim)) * 5).astype(np.float32)
            x[:, 7] = 300.0  # an outlier feature, as SmolLM2's
            w = rng.standard_normal(dim).astype(np.float32)
            y = tvm.runtime.tensor(np.zeros_like(x), DEV)
            lib[name](tvm.runtime.tensor(x, DEV), tvm.runtime.tensor(w, DEV), y)
            np.testing.assert_array_equal(y.numpy(), kernel_rms_norm(x, w, eps))
        x = _gate_up(rows, 96, rows)
        for name, model in (("silu", kernel_silu_mul), ("gelu", kernel_gelu_mul)):
            y = tvm.runtime.tensor(np.zeros((rows, 96), np.float32), DEV)
            lib[name](tvm.runtime.tensor(x, DEV), y)
            np.testing.assert_array_equal(y.numpy(), model(x[:, :96], x[:, 96:]), err_msg=name)


def test_gelu_mul_is_within_its_stated_error_of_the_exact_tanh_gelu():
    """norm_act_cpu.GELU_ERROR: |act − GELU_tanh| ≤ GELU_ERROR · max(|GELU_tanh|, 1e-3) for |g| ≤ 12 (float64
    exact values; 96k gates, up = 1), and saturation beyond: g for large g, ~0 for very negative g."""
    from shoal.models.kernels.norm_act_cpu import GELU_ERROR, gelu_mul_func

    lib = build({"gelu": gelu_mul_func(96)}, NATIVE)
    gate = np.linspace(-12, 12, 96 * 1000, dtype=np.float32).reshape(1000, 96)
    y = tvm.runtime.tensor(np.zeros(gate.shape, np.float32), DEV)
    lib["gelu"](tvm.runtime.tensor(np.concatenate([gate, np.ones_like(gate)], axis=1), DEV), y)
    g = gate.astype(np.float64)
    exact = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    err = np.abs(y.numpy() - exact) / np.maximum(np.abs(exact), 1e-3)
    assert err.max() <= GELU_ERROR, f"max scaled error {err.max():.3g} at g = {g.ravel()[err.argmax()]}"
    assert err.max() > GELU_ERROR / 100  # the check sees the kernel's own error, not an exact copy
    edge = np.array([[50.0, -50.0, 1e20, -1e20, 0.0] + [0.0] * 91], np.float32)
    y = tvm.runtime.tensor(np.zeros(edge.shape, np.float32), DEV)
    lib["gelu"](tvm.runtime.tensor(np.concatenate([edge, np.ones_like(edge)], axis=1), DEV), y)
    out = y.numpy()[0, :5]
    assert out[0] == 50.0 and out[2] == 1e20 and out[4] == 0.0
    assert abs(out[1]) < 1e-35 and abs(out[3]) < 1e-17


def test_fast_rms_norm_and_gated_mul_in_a_compiled_module():
    from shoal.models.kernels.relax_ops import FastRMSNorm, gated_mul, silu_mul

    class Block(nn.Module):
        def __init__(self):
            self.norm = FastRMSNorm(64, 1e-5, "llvm")

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            h = self.norm(x)
            return nn.op.concat([silu_mul(h, "llvm"), gated_mul(h, "gelu_tanh", "llvm")], dim=-1)

    mod, _ = Block().export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, "s", 64], "float32")}})
    exe = tvm.compile(mod, target=tvm.target.Target(PORTABLE), relax_pipeline=compile_pipeline(PORTABLE))
    vm = relax.VirtualMachine(exe, DEV)
    x = activations(5, 64, 1)[None]
    w = np.linspace(0.5, 1.5, 64, dtype=np.float32)
    got = vm["forward"](tvm.runtime.tensor(x, DEV), tvm.runtime.tensor(w, DEV)).numpy()
    h = (x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + 1e-5) * w).astype(np.float64)
    gate, up = h[..., :32], h[..., 32:]
    gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    ref = np.concatenate([gate / (1 + np.exp(-gate)) * up, gelu * up], axis=-1)
    assert got.shape == (1, 5, 64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_norm_and_gated_mul_fall_back_to_tvms_ops_off_the_cpu_or_off_16_lanes():
    """CUDA and widths that are not a multiple of 16 keep nn.RMSNorm / split + activation (same results)."""
    from shoal.models.kernels.relax_ops import FastRMSNorm, gated_mul, rms_norm_module

    assert isinstance(rms_norm_module(576, 1e-5, "x86_avx2"), FastRMSNorm)
    for dim, backend in ((576, "cuda"), (576, None), (72, "x86_avx2")):
        module = rms_norm_module(dim, 1e-5, backend)
        assert isinstance(module, nn.RMSNorm) and not isinstance(module, FastRMSNorm)
    with pytest.raises(ValueError, match="multiple of 16"):
        FastRMSNorm(72, 1e-5, "llvm")
    with pytest.raises(ValueError, match="unknown activation"):
        gated_mul(nn.Tensor.placeholder([1, 64], "float32"), "relu", "llvm")

    class Block(nn.Module):
        def __init__(self):
            self.norm = rms_norm_module(40, 1e-5, "llvm")

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return gated_mul(self.norm(x), "gelu_tanh", "llvm")  # width 20: TVM's ops

    mod, _ = Block().export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, "s", 40], "float32")}})
    assert not any("gelu_mul" in str(gv) or "rms_norm_40" in str(gv) for gv in mod.get_global_vars())
    exe = tvm.compile(mod, target=tvm.target.Target(PORTABLE), relax_pipeline=compile_pipeline(PORTABLE))
    x = activations(3, 40, 2)[None]
    w = np.ones(40, np.float32)
    got = relax.VirtualMachine(exe, DEV)["forward"](tvm.runtime.tensor(x, DEV), tvm.runtime.tensor(w, DEV))
    h = (x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + 1e-5)).astype(np.float64)
    gate, up = h[..., :20], h[..., 20:]
    gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    np.testing.assert_allclose(got.numpy(), gelu * up, rtol=1e-5, atol=1e-6)


def test_fast_cpu_attention_swaps_factories_only_for_llvm():
    from shoal.models.kernels.attention_cpu import attention_decode_cpu, fast_cpu_attention
    from shoal.models.kernels.rope_cpu import STOCK_ROPE, rope_cpu
    from tvm.relax.frontend.nn.llm import kv_cache

    with fast_cpu_attention({"kind": "cuda", "arch": "sm_90"}):
        assert kv_cache._attention_decode_cpu is not attention_decode_cpu
        assert kv_cache.llama_rope_with_position_map is STOCK_ROPE
    with fast_cpu_attention({"kind": "llvm"}):
        assert kv_cache.llama_rope_with_position_map is rope_cpu
    assert kv_cache.llama_rope_with_position_map is STOCK_ROPE
