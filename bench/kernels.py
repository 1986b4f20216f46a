"""Quantized kernel benchmark: for each weight shape of SmolLM2-135M (real Q4_1 / Q8_0 tensors from the
embedded GGUF), the decode GEMV (1 row) and the prefill GEMM (`--rows` rows) of models/kernels against NumPy
fp32 matmul on the dequantized matrix, in one run.

Columns: `hot` = weights in cache (TVM's time_evaluator / a NumPy loop over one matrix); `cold` = round-robin
over enough copies to exceed the last-level cache (a Python loop for both, ~1-2 µs call overhead included).
GB/s counts the bytes of the weights each call reads (packed for the kernels, fp32 for NumPy).

    python3 bench/kernels.py [--rows 200] [--threads 2] [--portable]
    python3 bench/kernels.py --kinds q8_0,q4_k,q6_k,q5_0 --threads 1   # generic GEMVs, Llama-3.2-1B shapes

`--kinds` times the generic block-type GEMV (models/kernels/qmatmul.py, this CPU's instruction set) on
random blocks of Llama-3.2-1B's decode shapes (qkv, gate_up, down) and prints bytes/s cold and hot beside a
NumPy read of 256 MiB (the streaming limit of one thread), as process CPU time (robust under load).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = [  # (GGUF tensor, calls of that shape per token: q+o, k+v, gate+up per layer, down, head)
    ("blk.0.attn_q.weight", 60), ("blk.0.attn_k.weight", 60), ("blk.0.ffn_gate.weight", 60),
    ("blk.0.ffn_down.weight", 30), ("token_embd.weight", 1),
]
COLD_BYTES = 160 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200, help="prefill rows for the GEMM columns")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--portable", action="store_true", help="also time the portable (non-VNNI) path")
    parser.add_argument("--cuda", action="store_true", help="also time the CUDA kernels on GPU 0")
    parser.add_argument("--kinds", default="",
                        help="comma-separated block types: time the generic GEMVs instead (e.g. q8_0,q4_k)")
    parser.add_argument("--stack-only", action="store_true",
                        help="only time the 30-layer stack of matmuls in one VM call (decode ceiling)")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    import gguf
    import numpy as np
    import tvm
    from shoal.models.embedded import embedded_model_path
    from shoal.models.kernels.gemm_q4 import gemm_func
    from shoal.models.kernels.gemv_q4 import gemv_func, quantize_act_func
    from shoal.models.kernels.quant import dequantize, pack_gguf_tensor, quantize_activations
    from shoal.models.kernels.tir_common import host_has_vnni
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": args.threads})
    paths = [("vnni", True)] if host_has_vnni() else []
    if args.portable or not paths:
        paths.append(("portable", False))
    dev = tvm.cpu()
    if args.kinds:
        kinds_table(target, args.kinds.split(","))
        return
    if args.stack_only:
        stack_table(target)
        return
    tensors = {t.name: t for t in gguf.GGUFReader(embedded_model_path()).tensors}
    print(f"target {target}, TVM_NUM_THREADS={args.threads}, load {os.getloadavg()[0]:.1f} "
          f"(2 shared cores: noisy — compare within a row)")
    header = (f"{'shape N x K':>16} {'path':>8} | {'GEMV hot us':>11} {'GB/s':>5} | {'GEMV cold us':>12} "
              f"{'GB/s':>5} | {f'GEMM M={args.rows} ms':>14} {'GMAC/s':>6}")
    print(header)
    print("-" * len(header))
    totals: dict[str, list[float]] = {}

    def loop_time(fn, calls: int) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(calls):
                fn(i)
            best = min(best, (time.perf_counter() - t0) / calls)
        return best

    for name, per_token in SHAPES:
        w = pack_gguf_tensor(tensors[name])
        n, k = w.out_features, w.in_features
        copies = max(1, COLD_BYTES // w.nbytes)
        rng = np.random.default_rng(0)
        x1 = rng.standard_normal((1, k)).astype(np.float32)
        xm = rng.standard_normal((args.rows, k)).astype(np.float32)
        for label, vnni in paths:
            mod = tvm.IRModule({"gemv": gemv_func(w.kind, n, k, vnni).with_attr("global_symbol", "gemv"),
                                "gemm": gemm_func(w.kind, n, k, vnni).with_attr("global_symbol", "gemm"),
                                "quant": quantize_act_func(k).with_attr("global_symbol", "quant")})
            lib = tvm.compile(mod, target=target).jit()

            def act(x):
                xq, xd, xds = quantize_activations(x)
                return [tvm.runtime.tensor(a, dev) for a in (xq.view(np.int32).reshape(len(x), -1), xd, xds)]

            weights = [[tvm.runtime.tensor(a, dev) for a in w.arrays()] for _ in range(copies)]
            a1, am = act(x1), act(xm)
            y1 = tvm.runtime.tensor(np.zeros((1, n), np.float32), dev)
            ym = tvm.runtime.tensor(np.zeros((args.rows, n), np.float32), dev)
            number = max(3, int(2e6 // w.nbytes))
            hot = lib.time_evaluator("gemv", dev, number=number, repeat=5)(*a1, *weights[0], y1).min
            gemv = lib["gemv"]
            cold = loop_time(lambda i, g=gemv, ws=weights, a=a1, y=y1: g(*a, *ws[i % len(ws)], y), 4 * copies)
            gemm = lib.time_evaluator("gemm", dev, number=1, repeat=3)(*am, *weights[0], ym).min
            del weights
            gmacs = args.rows * n * k / gemm / 1e9
            print(f"{n:>7} x {k:<6} {label:>8} | {hot * 1e6:11.1f} {w.nbytes / hot / 1e9:5.1f} | "
                  f"{cold * 1e6:12.1f} {w.nbytes / cold / 1e9:5.1f} | {gemm * 1e3:14.2f} {gmacs:6.1f}")
            acc = totals.setdefault(label, [0.0, 0.0])
            acc[0] += per_token * cold
            acc[1] += (per_token * gemm / args.rows) if name != "token_embd.weight" else 0.0
        wf = dequantize(w)
        fp32 = [wf] + [wf.copy() for _ in range(max(0, COLD_BYTES // wf.nbytes - 1))]
        hot = loop_time(lambda i, x=x1, m=wf: x @ m.T, 20)
        cold = loop_time(lambda i, x=x1, ms=fp32: x @ ms[i % len(ms)].T, 2 * len(fp32))
        gemm = loop_time(lambda i, x=xm, m=wf: x @ m.T, 2)
        del fp32
        print(f"{n:>7} x {k:<6} {'numpy':>8} | {hot * 1e6:11.1f} {wf.nbytes / hot / 1e9:5.1f} | "
              f"{cold * 1e6:12.1f} {wf.nbytes / cold / 1e9:5.1f} | {gemm * 1e3:14.2f} "
              f"{args.rows * n * k / gemm / 1e9:6.1f}")
        acc = totals.setdefault("numpy", [0.0, 0.0])
        acc[0] += per_token * cold
        acc[1] += (per_token * gemm / args.rows) if name != "token_embd.weight" else 0.0
    print("\nwhole model (30 layers: q, o 576x576; k, v 192x576; gate, up 1536x576; down 576x1536; + head):")
    for label, (decode, prefill) in totals.items():
        print(f"  {label:>8}: decode GEMVs {decode * 1e3:6.2f} ms/token (ceiling {1 / decode:6.0f} tok/s); "
              f"prefill GEMMs (no head) {prefill * 1e3:6.3f} ms/token ({1 / prefill:6.0f} tok/s)")
    if args.cuda:
        cuda_table(tensors, args.rows)
    stack_table(target)


KIND_SHAPES = [(3072, 2048), (16384, 2048), (2048, 8192)]
"""Llama-3.2-1B's fused qkv, fused gate_up and down projections (N x K)."""


def _gemv_without_prefetch(kind: str, n: int, k: int, isa: str):
    """The same GEMV built with PREFETCH_BYTES = 0 (no software prefetch), for the side-by-side column."""
    from shoal.models.kernels import qmatmul

    saved = qmatmul.PREFETCH_BYTES
    qmatmul.PREFETCH_BYTES = 0
    try:
        return qmatmul.qgemv_func.__wrapped__(kind, n, k, isa)
    finally:
        qmatmul.PREFETCH_BYTES = saved


def kinds_table(target, kinds: list[str], rounds: int = 5) -> None:
    """Generic GEMV per block type: process CPU time per call, cold (round-robin over copies > 200 MiB) and
    hot (one copy, L2/L3), as GB/s of the packed bytes read; beside it the same kernel without its software
    prefetch, alternated round by round (the ratio is the median of per-round ratios)."""
    import statistics

    import numpy as np
    import tvm
    from shoal.models.kernels.blocks import pack_blocks
    from shoal.models.kernels.qmatmul import qgemv_func
    from shoal.models.kernels.tir_common import has_avx2, has_vnni

    from bench.shaped_gguf import random_blocks

    isa = "vnni" if has_vnni(target) else "avx2" if has_avx2(target) else "portable"
    dev = tvm.cpu()
    data = np.ones(256 << 20, np.uint8)
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        data.view(np.uint64).sum()
        best = min(best, time.process_time() - t0)
    print(f"target {target} ({isa}), TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, load "
          f"{os.getloadavg()[0]:.1f}; NumPy read of 256 MiB: {data.nbytes / best / 1e9:.1f} GB/s")
    del data
    print(f"{'kind':>5} {'N x K':>13} {'MiB':>6} | {'cold us':>8} {'GB/s':>5} | {'hot us':>8} {'GB/s':>5} | "
          f"{'no-prefetch cold GB/s':>21} {'prefetch ×':>10}")
    rng = np.random.default_rng(0)
    for kind in kinds:
        for n, k in KIND_SHAPES:
            w = pack_blocks(kind, random_blocks(kind, n, k, rng), n, k)
            funcs = {"pf": qgemv_func(kind, n, k, isa), "nopf": _gemv_without_prefetch(kind, n, k, isa)}
            mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
            lib = tvm.compile(mod, target=target)
            nbytes = sum(a.nbytes for _, a in w.arrays)
            copies = max(2, (200 << 20) // nbytes)
            sets = [[tvm.runtime.tensor(a, dev) for _, a in w.arrays] for _ in range(copies)]
            x = tvm.runtime.tensor(rng.standard_normal((1, k)).astype(np.float32), dev)
            y = tvm.runtime.tensor(np.zeros((1, n), np.float32), dev)
            cold: dict[str, list[float]] = {"pf": [], "nopf": []}
            for r in range(rounds):
                for name in (("pf", "nopf") if r % 2 == 0 else ("nopf", "pf")):
                    gemv = lib[name]
                    t0 = time.process_time()
                    for ws in sets:
                        gemv(x, *ws, y)
                    cold[name].append((time.process_time() - t0) / copies)
            gemv = lib["pf"]
            t0 = time.process_time()
            for _ in range(100):
                gemv(x, *sets[0], y)
            hot = (time.process_time() - t0) / 100
            del sets
            ratio = statistics.median(b / a for a, b in zip(cold["pf"][1:], cold["nopf"][1:], strict=True))
            best_pf, best_no = min(cold["pf"]), min(cold["nopf"])
            print(f"{kind:>5} {n:>6} x {k:<5} {nbytes / 2**20:6.1f} | {best_pf * 1e6:8.1f} "
                  f"{nbytes / best_pf / 1e9:5.1f} | {hot * 1e6:8.1f} {nbytes / hot / 1e9:5.1f} | "
                  f"{nbytes / best_no / 1e9:21.1f} {ratio:9.2f}×", flush=True)


def stack_table(target) -> None:
    """Every matmul of a decode step in one Relax VM call: 30 × (qkv 576→960, o 576→576, gate_up 576→3072,
    SiLU·mul, down 1536→576, residual adds) + the 49152×576 head, random packed weights of the model's sizes.
    The ceiling the weight streaming sets for decode (no attention, no norms)."""
    import numpy as np
    import tvm
    from shoal.models.kernels.relax_ops import (
        QuantizedEmbedding,
        QuantizedLinear,
        compile_pipeline,
        kernel_backend,
    )
    from shoal.models.kernels.relax_ops import silu_mul as fused_silu_mul
    from tvm import relax
    from tvm.relax.frontend import nn

    backend = kernel_backend(target)

    class Layer(nn.Module):
        def __init__(self):
            self.qkv = QuantizedLinear(576, 960, "q4_1", backend)
            self.o = QuantizedLinear(576, 576, "q4_1", backend)
            self.gate_up = QuantizedLinear(576, 3072, "q4_1", backend)
            self.down = QuantizedLinear(1536, 576, "q4_1", backend)

        def forward(self, x):
            q, _ = nn.op.split(self.qkv(x), [576], axis=-1)
            x = x + self.o(q)
            return x + self.down(fused_silu_mul(self.gate_up(x), backend))

    class Stack(nn.Module):
        def __init__(self):
            self.layers = nn.ModuleList([Layer() for _ in range(30)])
            self.embed = QuantizedEmbedding(49152, 576, backend)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.embed.project(x)

    mod, params = Stack().export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, 1, 576], "float32")}})
    t0 = time.perf_counter()
    exe = tvm.compile(mod, target=target, relax_pipeline=compile_pipeline(target))
    compile_s = time.perf_counter() - t0
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    weights = []
    for _, p in params:
        shape = [int(d) for d in p.shape]
        if p.dtype == "uint32":
            weights.append(tvm.runtime.tensor(rng.integers(0, 2**32, shape, dtype=np.uint32), dev))
        else:
            weights.append(tvm.runtime.tensor((rng.uniform(-0.01, 0.01, shape)).astype(p.dtype), dev))
    nbytes = sum(w.numpy().nbytes for w in weights)
    vm = relax.VirtualMachine(exe, dev)
    x = tvm.runtime.tensor(rng.standard_normal((1, 1, 576)).astype(np.float32) * 0.1, dev)
    vm["forward"](x, *weights)
    times, cpu = [], []
    for _ in range(30):
        t0, c0 = time.perf_counter(), time.thread_time()
        vm["forward"](x, *weights)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    med = float(np.median(times))
    print(f"\ndecode-step matmul stack ({backend}), one VM call: compile {compile_s:.1f} s; "
          f"median {med * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms per token "
          f"({nbytes / 2**20:.0f} MiB of weights: {nbytes / med / 1e9:.1f} GB/s at the median; "
          f"ceiling {1 / med:.0f} tok/s)")
    if os.environ.get("TVM_NUM_THREADS") == "1":
        print(f"  calling thread's CPU time (the whole step runs on it with 1 thread; insensitive to other "
              f"processes' load): median {np.median(cpu) * 1e3:.2f} ms")


def cuda_table(tensors: dict, rows: int) -> None:
    """The CUDA matmul (models/kernels/cuda_q4.py) for each shape: 1 row and `rows` rows, GPU 0."""
    import numpy as np
    import tvm
    from shoal.models.kernels.cuda_q4 import cuda_matmul_func
    from shoal.models.kernels.quant import dequantize, pack_gguf_tensor

    dev = tvm.cuda(0)
    if not dev.exist:
        print("\nno CUDA device: skipping the CUDA table")
        return
    print(f"\nCUDA ({dev.device_name}), fp32 activations x packed weights")
    many = f"{rows} rows us"
    print(f"{'shape N x K':>16} | {'1 row us':>9} {'GB/s':>6} | {many:>11} {'GMAC/s':>7} | max rel err")
    for name, _ in SHAPES:
        w = pack_gguf_tensor(tensors[name])
        n, k = w.out_features, w.in_features
        mod = tvm.IRModule({"mm": cuda_matmul_func(w.kind, n, k).with_attr("global_symbol", "mm")})
        lib = tvm.compile(mod, target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"})).jit()
        weights = [tvm.runtime.tensor(a, dev) for a in w.arrays()]
        times = []
        for m in (1, rows):
            x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
            y = tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)
            xt = tvm.runtime.tensor(x, dev)
            times.append(lib.time_evaluator("mm", dev, number=20, repeat=5)(xt, *weights, y).min)
            ref = x @ dequantize(w).T
            err = float(np.abs(y.numpy() - ref).max() / np.abs(ref).max())
        print(f"{n:>7} x {k:<6} | {times[0] * 1e6:9.1f} {w.nbytes / times[0] / 1e9:6.1f} | "
              f"{times[1] * 1e6:11.1f} {rows * n * k / times[1] / 1e9:7.1f} | {err:.1e}")


if __name__ == "__main__":
    main()
