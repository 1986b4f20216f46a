"""The 4-bit matmul kernels (models/kernels): GGUF repacking, the NumPy reference of their math, the compiled
GEMV / GEMM / embedding PrimFuncs on the VNNI and portable paths, and QuantizedLinear inside compiled Relax
modules (CPU, and a CUDA build)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tvm = pytest.importorskip("tvm")

from shoal.models.kernels.embed_q8 import embedding_func  # noqa: E402
from shoal.models.kernels.gemm_q4 import gemm_func  # noqa: E402
from shoal.models.kernels.gemv_q4 import gemv_func, quantize_act_func  # noqa: E402
from shoal.models.kernels.quant import (  # noqa: E402
    concat_packed,
    dequantize,
    pack_q4_1,
    quantize_activations,
    reference_matmul,
)
from shoal.models.kernels.relax_ops import (  # noqa: E402
    QuantizedEmbedding,
    QuantizedLinear,
    compile_pipeline,
    kernel_backend,
    param_arrays,
)
from shoal.models.kernels.tir_common import has_vnni  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend import nn  # noqa: E402

from tests.models.kernel_helpers import (  # noqa: E402
    DEV,
    NATIVE,
    PORTABLE,
    ZNVER4,
    activations,
    build,
    model,
    model_weight,
    needs_vnni,
    random_q4_1,
    random_q8_0,
    rel_err,
    run_matmul,
)

# ----------------------------------------------------------------------------- layout and reference

@pytest.mark.parametrize("name", ["blk.0.attn_k.weight", "blk.3.ffn_down.weight", "token_embd.weight"])
def test_repack_round_trips_gguf_dequantize(name):
    rows = 256 if name == "token_embd.weight" else None  # a slice of the 49152-row table is enough
    w = model_weight(name, rows)
    raw = np.asarray(model().raw(name))[:rows]
    expected = gguf.quants.dequantize(raw, model().tensor_info(name).type)
    np.testing.assert_array_equal(dequantize(w), expected.reshape(w.out_features, w.in_features))
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
    w = model_weight(name, 4096 if name == "token_embd.weight" else None)
    x = activations(3, w.in_features, 1)
    assert rel_err(reference_matmul(x, w), x @ dequantize(w).T) < 1e-2


# ----------------------------------------------------------------------------- compiled PrimFuncs

@pytest.fixture(scope="module")
def q4_case():
    return random_q4_1(64, 96, 7)


@pytest.fixture(scope="module")
def q8_case():
    return random_q8_0(48, 96, 8)


def test_quantize_act_kernel_matches_numpy():
    x = activations(5, 96, 2)
    x[0, :4] = [0.5, -1.5, 2.5, 0.0]  # exact halves after scaling by 1/xd=1 need the same rounding
    x[0, 4:32] = 0.0
    x[0, 5] = 127.0
    lib = build({"quantize_act": quantize_act_func(96)}, NATIVE)  # runs here: this host may lack AVX-512
    outs = [tvm.runtime.tensor(np.zeros(s, dt), DEV)
            for s, dt in (((5, 24), np.int32), ((5, 3), np.float32), ((5, 3), np.float32))]
    lib["quantize_act"](tvm.runtime.tensor(x, DEV), *outs)
    xq, xd, xds = quantize_activations(x)
    np.testing.assert_array_equal(outs[0].numpy().view(np.int8).reshape(5, 96), xq)
    np.testing.assert_array_equal(outs[1].numpy(), xd)
    np.testing.assert_allclose(outs[2].numpy(), xds, rtol=1e-6)


@pytest.mark.parametrize("vnni", [pytest.param(True, marks=needs_vnni), False])
def test_gemv_and_gemm_match_reference(vnni, q4_case, q8_case):
    funcs = {"quantize_act": quantize_act_func(96)}
    for w in (q4_case, q8_case):
        funcs[f"gemv_{w.kind}"] = gemv_func(w.kind, w.out_features, 96, vnni)
        funcs[f"gemm_{w.kind}"] = gemm_func(w.kind, w.out_features, 96, vnni)
    lib = build(funcs, ZNVER4 if vnni else PORTABLE)
    for w in (q4_case, q8_case):
        for rows, fname in ((1, "gemv"), (3, "gemv"), (1, "gemm"), (5, "gemm"), (131, "gemm")):
            x = activations(rows, 96, rows)
            got = run_matmul(lib, x, w, f"{fname}_{w.kind}")
            ref = reference_matmul(x, w)
            assert rel_err(got, ref) < 1e-5, (w.kind, fname, rows)
            assert rel_err(got, x @ dequantize(w).T) < 3e-2  # synthetic weights; real ones: see above


@pytest.mark.parametrize("vnni", [pytest.param(True, marks=needs_vnni), False])
def test_fused_gemv_quantizes_inside_and_matches_reference(vnni, q4_case, q8_case):
    weights = (q4_case, q8_case)
    lib = build({f"gemv_{w.kind}": gemv_func(w.kind, w.out_features, 96, vnni, fused=True) for w in weights},
                ZNVER4 if vnni else PORTABLE)
    for w in (q4_case, q8_case):
        for rows in (1, 4):
            x = activations(rows, 96, rows + 7)
            y = tvm.runtime.tensor(np.zeros((rows, w.out_features), np.float32), DEV)
            packed = [tvm.runtime.tensor(a, DEV) for a in w.arrays()]
            lib[f"gemv_{w.kind}"](tvm.runtime.tensor(x, DEV), *packed, y)
            assert rel_err(y.numpy(), reference_matmul(x, w)) < 1e-5, (w.kind, rows)


@needs_vnni
def test_gemv_on_a_model_weight():
    w = model_weight("blk.2.attn_q.weight")
    lib = build({"quantize_act": quantize_act_func(576), "gemv": gemv_func("q4_1", 576, 576, True)}, ZNVER4)
    x = activations(2, 576, 3)
    assert rel_err(run_matmul(lib, x, w, "gemv"), reference_matmul(x, w)) < 1e-5


def test_embedding_kernel_gathers_dequantized_rows(q8_case):
    lib = build({"embed": embedding_func(48, 96)}, NATIVE)
    ids = np.array([0, 47, 17, 17, 31], np.int32)
    out = tvm.runtime.tensor(np.zeros((5, 96), np.float32), DEV)
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


def test_quantized_linear_in_a_compiled_module():
    target = NATIVE
    net = TwoLayers(kernel_backend(target))
    spec = {"prefill": {"ids": nn.spec.Tensor([1, "seq_len"], "int32"), "$": {"effect_mode": "none"}},
            "decode": {"ids": nn.spec.Tensor(["batch", 1], "int32"), "$": {"effect_mode": "none"}}}
    net.prefill = net.forward
    net.decode = net.forward
    mod, params = net.export_tvm(spec=spec)
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
    net = TwoLayers(kernel_backend(target))
    net.prefill = net.forward
    net.decode = net.forward
    spec = {"prefill": {"ids": nn.spec.Tensor([1, "seq_len"], "int32"), "$": {"effect_mode": "none"}},
            "decode": {"ids": nn.spec.Tensor(["batch", 1], "int32"), "$": {"effect_mode": "none"}}}
    mod, _ = net.export_tvm(spec=spec)
    exe = tvm.compile(mod, target=tvm.target.Target(target), relax_pipeline=relax.get_default_pipeline(
        tvm.target.Target(target)))
    assert exe is not None


def test_safe_reshape_rewrite_keeps_kernels_and_makes_reshapes_views():
    from shoal.models.kernels.pipeline import with_safe_reshape_rewrite
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

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
    from shoal.models.kernels.cuda_q4 import cuda_matmul_func

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


