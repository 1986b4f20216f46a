"""Shared helpers for the kernel tests (tests/models/test_kernels.py, test_kernel_ops.py): targets,
synthetic GGUF-style blocks, the embedded model's packed tensors, building and running PrimFuncs."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import tvm
from shoal.models.embedded import embedded_model_path
from shoal.models.gguf import GGUFModel
from shoal.models.kernels.quant import PackedWeight, pack_q4_1, pack_q8_0
from shoal.models.kernels.tir_common import host_has_avx2, host_has_vnni
from tvm.target import codegen

ZNVER4 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
PORTABLE = {"kind": "llvm", "num-cores": 2}  # x86-64 baseline: no AVX-512, so the portable path
DEV = tvm.cpu()
HOST_VNNI = host_has_vnni()
needs_vnni = pytest.mark.skipif(not HOST_VNNI, reason="this CPU has no AVX-512 VNNI")
HOST_AVX2 = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2}
NATIVE = ZNVER4 if HOST_VNNI else (HOST_AVX2 if host_has_avx2() else PORTABLE)
"""The CPU target the tests run kernels on: VNNI where this CPU has it, else this CPU (with FMA, as the
NumPy references of the float kernels assume) where it has AVX2."""


@cache
def model() -> GGUFModel:
    return GGUFModel.open(embedded_model_path())


def model_weight(name: str, rows: int | None = None) -> PackedWeight:
    """A Q4_1 / Q8_0 tensor of the embedded model, packed (optionally only its first `rows` rows)."""
    info = model().tensor_info(name)
    out_features, in_features = info.shape
    raw = np.asarray(model().raw(name))
    if rows is not None:
        raw, out_features = raw[:rows], rows
    pack = pack_q4_1 if info.type.name.lower() == "q4_1" else pack_q8_0
    return pack(raw, out_features, in_features)


def random_q4_1(n: int, k: int, seed: int) -> PackedWeight:
    rng = np.random.default_rng(seed)
    blocks = np.empty((n, k // 32, 20), np.uint8)
    blocks[:, :, 0:2] = rng.uniform(0.001, 0.02, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
    blocks[:, :, 2:4] = rng.uniform(-0.15, 0.0, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
    blocks[:, :, 4:] = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    return pack_q4_1(blocks, n, k)


def random_q8_0(n: int, k: int, seed: int) -> PackedWeight:
    rng = np.random.default_rng(seed)
    blocks = np.empty((n, k // 32, 34), np.uint8)
    blocks[:, :, 0:2] = rng.uniform(0.001, 0.01, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
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
