"""The 4-bit kernels (models/kernels): GGUF repacking, the NumPy reference of their math, the compiled
GEMV / GEMM / embedding PrimFuncs on the VNNI and portable paths, and QuantizedLinear inside a compiled
Relax module."""

from __future__ import annotations

import shutil
from functools import cache

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.relax.frontend import nn  # noqa: E402

from models.embedded import embedded_model_path  # noqa: E402
from models.kernels.embed_q8 import embedding_func  # noqa: E402
from models.kernels.gemm_q4 import gemm_func  # noqa: E402
from models.kernels.gemv_q4 import gemv_func, quantize_act_func  # noqa: E402
from models.kernels.quant import (  # noqa: E402
    PackedWeight,
    concat_packed,
    dequantize,
    pack_gguf_tensor,
    pack_q4_1,
    pack_q8_0,
    quantize_activations,
    reference_matmul,
)
from models.kernels.relax_ops import (  # noqa: E402
    QuantizedEmbedding,
    QuantizedLinear,
    compile_pipeline,
    kernel_backend,
    param_arrays,
)
from models.kernels.tir_common import has_vnni, host_has_vnni  # noqa: E402

ZNVER4 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
PORTABLE = {"kind": "llvm", "num-cores": 2}  # x86-64 baseline: no AVX-512, so the portable path
DEV = tvm.cpu()


needs_vnni = pytest.mark.skipif(not host_has_vnni(), reason="this CPU has no AVX-512 VNNI")


@cache
def model_tensors() -> dict:
    return {t.name: t for t in gguf.GGUFReader(embedded_model_path()).tensors}


def random_q4_1(n: int, k: int, seed: int) -> PackedWeight:
    rng = np.random.default_rng(seed)
    blocks = np.empty((n, k // 32, 20), np.uint8)
    blocks[:, :, 0:2] = (rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float16)).view(np.uint8).reshape(
        n, k // 32, 2)
    blocks[:, :, 2:4] = (rng.uniform(-0.15, 0.0, (n, k // 32)).astype(np.float16)).view(np.uint8).reshape(
        n, k // 32, 2)
    blocks[:, :, 4:] = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    return pack_q4_1(blocks, n, k)


def random_q8_0(n: int, k: int, seed: int) -> PackedWeight:
    rng = np.random.default_rng(seed)
    blocks = np.empty((n, k // 32, 34), np.uint8)
    blocks[:, :, 0:2] = (rng.uniform(0.001, 0.01, (n, k // 32)).astype(np.float16)).view(np.uint8).reshape(
        n, k // 32, 2)
    blocks[:, :, 2:] = rng.integers(-127, 128, (n, k // 32, 32)).astype(np.int8).view(np.uint8)
    return pack_q8_0(blocks, n, k)


def activations(b: int, k: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((b, k)) * 2).astype(np.float32)


def build(funcs: dict, target: dict) -> tvm.runtime.Module:
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    return tvm.compile(mod, target=tvm.target.Target(target))


def run_matmul(lib, x: np.ndarray, w: PackedWeight, fname: str) -> np.ndarray:
    b, k = x.shape
    outs = [tvm.runtime.tensor(np.zeros(s, dt), DEV)
            for s, dt in (((b, k // 4), np.int32), ((b, k // 32), np.float32), ((b, k // 32), np.float32))]
    lib["quantize_act"](tvm.runtime.tensor(x, DEV), *outs)
    y = tvm.runtime.tensor(np.zeros((b, w.out_features), np.float32), DEV)
    lib[fname](*outs, *[tvm.runtime.tensor(a, DEV) for a in w.arrays()], y)
    return y.numpy()


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------- layout and reference

@pytest.mark.parametrize("name", ["blk.0.attn_k.weight", "blk.3.ffn_down.weight", "token_embd.weight"])
def test_repack_round_trips_gguf_dequantize(name):
    t = model_tensors()[name]
    w = pack_gguf_tensor(t)
    np.testing.assert_array_equal(dequantize(w), gguf.quants.dequantize(t.data, t.tensor_type))
    bits = 8 * w.nbytes / (w.out_features * w.in_features)
    assert bits == (5.0 if w.kind == "q4_1" else 8.5)


def test_concat_packed_stacks_rows():
    a, b = random_q4_1(32, 64, 1), random_q4_1(16, 64, 2)
    both = concat_packed([a, b])
    np.testing.assert_array_equal(dequantize(both), np.concatenate([dequantize(a), dequantize(b)]))
    with pytest.raises(ValueError):
        concat_packed([a, random_q8_0(16, 64, 3)])


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_q4_1(np.zeros(20 * 8, np.uint8), 8, 32)
    with pytest.raises(ValueError, match="expected"):
        pack_q4_1(np.zeros(10, np.uint8), 16, 32)


def test_activation_quantization_matches_llama_cpp_q8_1_rules():
    x = activations(2, 64, 0)
    x[0, :32] = 0.0  # an all-zero group: scale 0, codes 0
    x[1, 0] = -3 * np.abs(x[1, :32]).max()
    xq, xd, xds = quantize_activations(x)
    assert xd[0, 0] == 0 and not xq[0, :32].any() and xds[0, 0] == 0
    assert xq[1, 0] == -127 and np.abs(xq).max() <= 127
    back = xq[1].astype(np.float32) * np.repeat(xd[1], 32)
    np.testing.assert_allclose(back, x[1], atol=xd[1].max() / 2 + 1e-7)


@pytest.mark.parametrize("name", ["blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "token_embd.weight"])
def test_reference_stays_close_to_fp32_matmul(name):
    """Quantizing activations to int8 per 32 costs ≤ 1e-2 of the output scale against fp32 (≈ 4e-3 typ.)."""
    w = pack_gguf_tensor(model_tensors()[name])
    x = activations(3, w.in_features, 1)
    assert rel_err(reference_matmul(x, w), x @ dequantize(w).T) < 1e-2


# ----------------------------------------------------------------------------- compiled PrimFuncs

@pytest.fixture(scope="module")
def q4_case():
    return random_q4_1(64, 96, 7)


@pytest.fixture(scope="module")
def q8_case():
    return random_q8_0(48, 64, 8)


def test_quantize_act_kernel_matches_numpy():
    x = activations(5, 96, 2)
    x[0, :4] = [0.5, -1.5, 2.5, 0.0]  # exact halves after scaling by 1/xd=1 need the same rounding
    x[0, 4:32] = 0.0
    x[0, 5] = 127.0
    lib = build({"quantize_act": quantize_act_func(96)}, ZNVER4)
    outs = [tvm.runtime.tensor(np.zeros(s, dt), DEV)
            for s, dt in (((5, 24), np.int32), ((5, 3), np.float32), ((5, 3), np.float32))]
    lib["quantize_act"](tvm.runtime.tensor(x, DEV), *outs)
    xq, xd, xds = quantize_activations(x)
    np.testing.assert_array_equal(outs[0].numpy().view(np.int8).reshape(5, 96), xq)
    np.testing.assert_array_equal(outs[1].numpy(), xd)
    np.testing.assert_allclose(outs[2].numpy(), xds, rtol=1e-6)


@pytest.mark.parametrize("vnni", [pytest.param(True, marks=needs_vnni), False])
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_gemv_and_gemm_match_reference(kind, vnni, q4_case, q8_case):
    w = q4_case if kind == "q4_1" else q8_case
    n, k = w.out_features, w.in_features
    target = ZNVER4 if vnni else PORTABLE
    lib = build({"quantize_act": quantize_act_func(k), "gemv": gemv_func(kind, n, k, vnni),
                 "gemm": gemm_func(kind, n, k, vnni)}, target)
    for rows, fname in ((1, "gemv"), (3, "gemv"), (1, "gemm"), (5, "gemm"), (131, "gemm")):
        x = activations(rows, k, rows)
        got = run_matmul(lib, x, w, fname)
        ref = reference_matmul(x, w)
        assert rel_err(got, ref) < 1e-5, (fname, rows)
        assert rel_err(got, x @ dequantize(w).T) < 3e-2  # synthetic weights; real ones: see above


@needs_vnni
def test_gemv_on_a_model_weight():
    w = pack_gguf_tensor(model_tensors()["blk.2.attn_q.weight"])
    lib = build({"quantize_act": quantize_act_func(576), "gemv": gemv_func("q4_1", 576, 576, True)}, ZNVER4)
    x = activations(2, 576, 3)
    assert rel_err(run_matmul(lib, x, w, "gemv"), reference_matmul(x, w)) < 1e-5


def test_embedding_kernel_gathers_dequantized_rows(q8_case):
    lib = build({"embed": embedding_func(48, 64)}, ZNVER4)
    ids = np.array([0, 47, 17, 17, 31], np.int32)
    out = tvm.runtime.tensor(np.zeros((5, 64), np.float32), DEV)
    lib["embed"](tvm.runtime.tensor(ids, DEV), *[tvm.runtime.tensor(a, DEV) for a in q8_case.arrays()], out)
    np.testing.assert_array_equal(out.numpy(), dequantize(q8_case)[ids])


def test_backend_choice():
    assert kernel_backend(ZNVER4) == "x86_vnni" and has_vnni(ZNVER4)
    assert kernel_backend(PORTABLE) == "llvm"
    assert kernel_backend({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}) == "llvm"
    assert kernel_backend({"kind": "cuda", "arch": "sm_90"}) == "cuda"
    with pytest.raises(ValueError):
        QuantizedLinear(100, 64)


# ----------------------------------------------------------------------------- QuantizedLinear in Relax

class TwoLayers(nn.Module):
    def __init__(self, backend: str):
        self.embed = QuantizedEmbedding(48, 64, backend)
        self.up = QuantizedLinear(64, 96, "q4_1", backend)
        self.down = QuantizedLinear(96, 64, "q4_1", backend)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        h = self.down(self.up(self.embed(ids)))
        return self.embed.project(h)


def two_layer_reference(ids: np.ndarray, packs: dict) -> np.ndarray:
    h = dequantize(packs["embed"])[ids.reshape(-1)]
    h = reference_matmul(reference_matmul(h, packs["up"]), packs["down"])
    return reference_matmul(h, packs["embed"]).reshape(*ids.shape, -1)


@pytest.mark.parametrize("target", [pytest.param(ZNVER4, marks=needs_vnni), PORTABLE])
def test_quantized_linear_in_a_compiled_module(target):
    model = TwoLayers(kernel_backend(target))
    spec = {"prefill": {"ids": nn.spec.Tensor([1, "seq_len"], "int32"), "$": {"effect_mode": "none"}},
            "decode": {"ids": nn.spec.Tensor(["batch", 1], "int32"), "$": {"effect_mode": "none"}}}
    model.prefill = model.forward
    model.decode = model.forward
    mod, params = model.export_tvm(spec=spec)
    exe = tvm.compile(mod, target=tvm.target.Target(target), relax_pipeline=compile_pipeline(target))
    vm = relax.VirtualMachine(exe, DEV)
    packs = {"embed": random_q8_0(48, 64, 11), "up": random_q4_1(96, 64, 12), "down": random_q4_1(64, 96, 13)}
    arrays = {f"{layer}.{n}": a for layer, p in packs.items() for n, a in param_arrays(p).items()}
    weights = [tvm.runtime.tensor(arrays[name], DEV) for name, _ in params]
    for fname, ids in (("decode", np.array([[3], [40], [7]], np.int32)),
                       ("prefill", np.arange(0, 21, dtype=np.int32)[None] * 2 % 48)):
        got = vm[fname](tvm.runtime.tensor(ids, DEV), *weights).numpy()
        ref = two_layer_reference(ids, packs)
        assert got.shape == ref.shape
        # chained layers re-quantize activations: a last-bit fp32 difference can move one int8 code
        assert rel_err(got, ref) < 1e-2, fname
        assert np.mean(np.abs(got - ref) <= 1e-4 * np.abs(ref).max()) > 0.95, fname


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_module_builds_for_sm90_with_the_cuda_pipeline():
    """The same nn.Module as above, exported for CUDA and compiled with TVM's CUDA pipeline (dlight rules
    leave the hand-written kernels alone: they carry `tirx.is_scheduled`)."""
    target = {"kind": "cuda", "arch": "sm_90"}
    model = TwoLayers(kernel_backend(target))
    model.prefill = model.forward
    model.decode = model.forward
    spec = {"prefill": {"ids": nn.spec.Tensor([1, "seq_len"], "int32"), "$": {"effect_mode": "none"}},
            "decode": {"ids": nn.spec.Tensor(["batch", 1], "int32"), "$": {"effect_mode": "none"}}}
    mod, _ = model.export_tvm(spec=spec)
    exe = tvm.compile(mod, target=tvm.target.Target(target), relax_pipeline=relax.get_default_pipeline(
        tvm.target.Target(target)))
    assert exe is not None


def test_safe_reshape_rewrite_keeps_kernels_and_makes_reshapes_views():
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from models.kernels.pipeline import with_safe_reshape_rewrite

    class Two(nn.Module):
        def __init__(self):
            self.up = QuantizedLinear(64, 96, "q4_1", "llvm")
            self.down = QuantizedLinear(96, 64, "q4_1", "llvm")

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return self.down(self.up(x))

    target = tvm.target.Target(PORTABLE)
    mod, _ = Two().export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, "s", 64], "float32")}})
    with target:
        lower = with_safe_reshape_rewrite(cpu_generic.dataflow_lower_passes(target))
        mod = tvm.transform.Sequential(cpu_generic.legalize_passes(target) + lower)(mod)
    text = mod["forward"].script()
    assert text.count("R.reshape(") >= 3  # views; only the function's output reshape stays a copy
    names = {gv.name_hint for gv in mod.functions}
    assert {"gemm_q4_1_96x64", "gemm_q4_1_64x96", "quantize_act_64", "quantize_act_96"} <= names
    assert not isinstance(mod[mod.get_global_var("gemm_q4_1_96x64")].body, tvm.s_tir.SBlockRealize)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_cuda_matmul_matches_fp32_on_a_gpu(kind, q4_case, q8_case):
    from models.kernels.cuda_q4 import cuda_matmul_func

    gpu = tvm.cuda(0)
    if not gpu.exist:
        pytest.skip("no CUDA device")
    w = q4_case if kind == "q4_1" else q8_case
    func = cuda_matmul_func(kind, w.out_features, w.in_features)
    lib = build({"mm": func}, {"kind": "cuda", "arch": "sm_90"})
    for rows in (1, 3, 70):
        x = activations(rows, w.in_features, rows)
        y = tvm.runtime.tensor(np.zeros((rows, w.out_features), np.float32), gpu)
        lib["mm"](tvm.runtime.tensor(x, gpu), *[tvm.runtime.tensor(a, gpu) for a in w.arrays()], y)
        assert rel_err(y.numpy(), x @ dequantize(w).T) < 1e-5


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
    from tvm.relax.frontend.nn.llm import kv_cache

    from models.kernels.attention_cpu import attention_decode_cpu, fast_cpu_attention

    h_kv, h_qo, d, scale = 3, 9, 64, 0.125
    case = paged_case([37, 16, 1, 200], h_kv, h_qo, d, 5)
    ours = attention_decode_cpu(h_kv, h_qo, d, "float32", False, {})
    stock = kv_cache._attention_decode_cpu(h_kv, h_qo, d, "float32", False, {})
    lib = build({"ours": ours, "stock": stock.with_attr("global_symbol", "stock")}, ZNVER4)
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


def test_fast_prefill_attention_matches_numpy():
    from tvm.relax.frontend.nn.llm import kv_cache

    from models.kernels.attention_cpu import attention_prefill_ragged_cpu

    h_kv, h_q, d, scale = 3, 9, 64, 0.125
    rng = np.random.default_rng(9)
    lens = [37, 1, 20]
    total = sum(lens)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q = rng.standard_normal((total, h_q, d)).astype(np.float32)
    k = rng.standard_normal((total, h_kv, d)).astype(np.float32)
    v = rng.standard_normal((total, h_kv, d)).astype(np.float32)
    ours = attention_prefill_ragged_cpu(h_kv, h_q, d, d, "float32", {})
    stock = kv_cache._attention_prefill_ragged_cpu(h_kv, h_q, d, d, "float32", {})
    lib = build({"ours": ours, "stock": stock.with_attr("global_symbol", "stock")}, ZNVER4)
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
        for name in ("ours", "stock"):
            out = tvm.runtime.tensor(np.zeros_like(q), DEV)
            lse = tvm.runtime.tensor(np.zeros((total, h_q), np.float32), DEV)
            args = [q, indptr, k, v, indptr, np.zeros(total, np.int32), np.zeros(len(lens), np.int32)]
            lib[name](*[tvm.runtime.tensor(a, DEV) for a in args], out, lse, causal, 0, 1.0, 1e4, scale)
            np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, err_msg=f"{name} causal={causal}")


def test_fast_rope_matches_tvms_kernel():
    from tvm.relax.frontend.nn.llm import kv_cache

    from models.kernels.rope_cpu import rope_cpu

    args = (100000.0, 1.0, 64, 9, 3, "float32", {"rope_type": "gptj"})
    lib = build({"ours": rope_cpu(*args), "stock": kv_cache.llama_rope_with_position_map(*args)}, ZNVER4)
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
    from models.kernels.norm_act_cpu import rms_norm_func, silu_mul_func

    lib = build({"rms": rms_norm_func(96, 1e-5), "silu": silu_mul_func(64)}, ZNVER4)
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


def test_fast_rms_norm_and_silu_mul_in_a_compiled_module():
    from models.kernels.relax_ops import FastRMSNorm, silu_mul

    class Block(nn.Module):
        def __init__(self):
            self.norm = FastRMSNorm(64, 1e-5, "llvm")

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return silu_mul(self.norm(x), "llvm")

    mod, _ = Block().export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, "s", 64], "float32")}})
    exe = tvm.compile(mod, target=tvm.target.Target(PORTABLE), relax_pipeline=compile_pipeline(PORTABLE))
    vm = relax.VirtualMachine(exe, DEV)
    x = activations(5, 64, 1)[None]
    w = np.linspace(0.5, 1.5, 64, dtype=np.float32)
    got = vm["forward"](tvm.runtime.tensor(x, DEV), tvm.runtime.tensor(w, DEV)).numpy()
    h = x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + 1e-5) * w
    ref = h[..., :32] / (1 + np.exp(-h[..., :32])) * h[..., 32:]
    assert got.shape == (1, 5, 32)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
