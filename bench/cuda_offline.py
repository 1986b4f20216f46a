"""Decode/prefill speed of compiled shards on an NVIDIA GPU whose machine has neither TVM's compiler nor the
model file (the lent GPU boxes: their own Python, no network, 64 MiB carried with the working tree).

    # here (TVM with its compiler, nvcc, the embedded model):
    python bench/cuda_offline.py prepare --arch sm_90 --ffi-wheel apache_tvm_ffi-…-cp312-….whl
    # on the GPU machine, from the repository root (carry .cache/gpu):
    LD_LIBRARY_PATH=.cache/gpu/rt/cudalib:.cache/gpu/rt/tvm_ffi/lib python bench/cuda_offline.py run

`prepare` builds the 30-layer shard for cuda (f32 and q4_1), compiles each library's CUDA source to a fatbin
with nvcc (TVM 0.27 otherwise compiles it when the library is loaded), and copies TVM's runtime (no compiler:
~16 MB), tvm_ffi for the device's Python, libcudart and the model's tensor index. `run` loads each library
with runtime-only TVM and synthetic weights of the model's exact shapes and types (speed does not depend on
the values) and prints prefill/decode tok/s. No correctness claims: that is tests/models/test_compiled.py.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
QUANTS = ("f32", "q4_1")


def prepare(out: Path, arch: str, ffi_wheel: Path | None) -> None:
    import tvm
    import tvm.support.nvcc as nvcc
    import tvm_ffi
    from shoal.models.compile import _entry_name, _file_sha256, _pipeline, compile_key, model_fingerprint
    from shoal.models.embedded import embedded_model_path
    from shoal.models.gguf import GGUFModel
    from shoal.models.llama import export_shard
    from shoal.models.span import LayerSpan
    from shoal.models.targets import TargetSpec

    rt = out / "rt"
    shutil.rmtree(out, ignore_errors=True)
    (out / "lib").mkdir(parents=True)
    (out / "cubin").mkdir()
    skip = shutil.ignore_patterns("libtvm_compiler.so", "3rdparty", "include", "src", "web", "cmake",
                                  "licenses", "__pycache__")
    shutil.copytree(Path(tvm.__file__).parent, rt / "tvm", ignore=skip)
    if ffi_wheel:
        with zipfile.ZipFile(ffi_wheel) as whl:
            whl.extractall(rt)
        for extra in ("include", "src", "3rdparty"):
            shutil.rmtree(rt / "tvm_ffi" / extra, ignore_errors=True)
    else:
        shutil.copytree(Path(tvm_ffi.__file__).parent, rt / "tvm_ffi", ignore=skip)
    (rt / "cudalib").mkdir()
    ldd = subprocess.run(["ldd", str(rt / "tvm" / "lib" / "libtvm_runtime_cuda.so")], capture_output=True,
                         text=True, check=False).stdout
    for line in ldd.splitlines():
        if "libcudart" in line and "=>" in line and "/" in line:
            shutil.copy(line.split("=>")[1].split("(")[0].strip(), rt / "cudalib")
    model = GGUFModel.open(embedded_model_path())
    index = {"config": model.config.to_dict(),
             "tensors": {n: [int(t.type), list(t.shape), t.size] for n, t in model.index.tensors.items()}}
    (out / "model_index.json").write_text(json.dumps(index))
    target = TargetSpec("cuda", {"kind": "cuda", "arch": arch, "max_threads_per_block": 1024,
                                 "max_shared_memory_per_block": 49152})
    tvm_target = target.tvm_target()
    span = LayerSpan.whole(model.config.num_layers)
    for quant in QUANTS:
        start = time.perf_counter()
        mod, named = export_shard(model.config, span, tvm_target, quant)
        pipeline = _pipeline(target, tvm_target, quant, None)
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline)
        sources: list[str] = []

        def walk(module: Any, sources: list[str] = sources) -> None:
            for sub in module.imports:
                if "cuda" in str(getattr(sub, "kind", "")):
                    sources.append(sub.inspect_source())
                walk(sub)

        walk(executable.mod)
        for code in sources:
            with tvm_target:
                binary = nvcc.compile_cuda(code, target_format="fatbin", compiler="nvcc", arch=arch)
            (out / "cubin" / f"{hashlib.sha256(code.encode()).hexdigest()}.fatbin").write_bytes(binary)
        key = compile_key(model_fingerprint(model), span, quant, target)
        library = out / "lib" / f"{_entry_name(model.config, span, quant, target, key)}.so"
        executable.export_library(str(library))
        params = [[n, [int(d) for d in p.shape], str(p.dtype)] for n, p in named]
        library.with_suffix(".json").write_text(json.dumps({
            "key": key, "target": target.attrs, "params": params, "size": library.stat().st_size,
            "sha256": _file_sha256(library), "compile_seconds": time.perf_counter() - start}))
        print(f"{quant}: {library.name}, {len(sources)} CUDA module(s), {time.perf_counter() - start:.1f} s")


class _QType(enum.IntEnum):
    F32 = 0
    Q4_1 = 3
    Q8_0 = 8


class _Info:
    def __init__(self, kind: int, shape: list[int], size: int) -> None:
        self.type, self.shape, self.size = _QType(kind), tuple(shape), size


class SyntheticModel:
    """Stands in for a GGUFModel: the real tensor index, random blocks with sane scales."""

    path = None

    def __init__(self, index: dict[str, Any]) -> None:
        import numpy as np
        from shoal.models.config import ModelConfig

        self.np = np
        self.config = ModelConfig(**index["config"])
        self.tensors = {n: _Info(*v) for n, v in index["tensors"].items()}
        self.rng = np.random.default_rng(0)

    def tensor_info(self, name: str) -> _Info:
        return self.tensors[name]

    def raw(self, name: str) -> Any:
        np, info = self.np, self.tensors[name]
        data = self.rng.integers(0, 256, size=info.size, dtype=np.uint8)
        half = lambda v: np.frombuffer(np.float16(v).tobytes(), np.uint8)  # noqa: E731
        if info.type == _QType.Q4_1:
            data.reshape(-1, 20)[:, 0:2], data.reshape(-1, 20)[:, 2:4] = half(0.01), half(-0.08)
        elif info.type == _QType.Q8_0:
            data.reshape(-1, 34)[:, 0:2] = half(0.004)
        return data

    def dequantize(self, name: str) -> Any:
        np, info = self.np, self.tensors[name]
        if len(info.shape) == 1:
            return np.ones(info.shape, np.float32)
        return (self.rng.standard_normal(info.shape) * 0.02).astype(np.float32)


def run(folder: Path, quants: list[str], steps: int = 128, repeats: int = 3) -> None:
    import ctypes

    if (folder / "rt").is_dir():
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"
        sys.path.insert(0, str(folder / "rt"))
    import numpy as np
    import tvm
    import tvm_ffi

    for lib in ("libtvm_runtime_extra.so", "libtvm_runtime_cuda.so"):  # not autoloaded without the compiler
        ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / lib), mode=ctypes.RTLD_GLOBAL)

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _prebuilt(code: str, *_args: Any) -> bytes:
        return (folder / "cubin" / f"{hashlib.sha256(code.encode()).hexdigest()}.fatbin").read_bytes()

    from shoal.models.compile import CompiledShard
    from shoal.models.runtime import CompiledStage
    from shoal.models.shard_weights import load_shard_weights
    from shoal.models.span import LayerSpan
    from shoal.models.targets import TargetSpec

    model = SyntheticModel(json.loads((folder / "model_index.json").read_text()))
    dev = tvm.cuda(0)
    print(f"GPU: compute {dev.compute_version}, {dev.multi_processor_count} SMs")
    for quant in quants:
        manifest = next((folder / "lib").glob(f"*-{quant}-cuda-*.json"))
        info = json.loads(manifest.read_text())
        shard = CompiledShard(library=manifest.with_suffix(".so"), manifest=manifest, key=info["key"],
                              span=LayerSpan.whole(model.config.num_layers), quantization=quant,
                              target=TargetSpec("cuda", info["target"]),
                              params=tuple((p[0], tuple(p[1]), p[2]) for p in info["params"]),
                              compile_seconds=0.0, cached=True)
        stage = CompiledStage(model.config, shard, load_shard_weights(model, shard, dev))
        ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=200).astype(np.int32)
        prefill, decode = [], []
        for r in range(repeats + 1):  # the first run warms up
            stage.add_sequence(r)
            t0 = time.perf_counter()
            token = int(stage.prefill(r, ids).argmax())
            t1 = time.perf_counter()
            for _ in range(steps):
                token = int(stage.decode([r], np.asarray([token], np.int32))[0].argmax())
            t2 = time.perf_counter()
            stage.remove_sequence(r)
            if r:
                prefill.append(len(ids) / (t1 - t0))
                decode.append(steps / (t2 - t1))
        seqs = list(range(100, 108))
        for s in seqs:
            stage.add_sequence(s)
            stage.prefill(s, ids[:32])
        tokens = np.zeros(len(seqs), np.int32)
        t0 = time.perf_counter()
        for _ in range(64):
            tokens = stage.decode(seqs, tokens).argmax(axis=1).astype(np.int32)
        batch = len(seqs) * 64 / (time.perf_counter() - t0)
        stage.close()
        print(json.dumps({"quantization": quant, "prefill_tps": statistics.median(prefill),
                          "decode_tps": statistics.median(decode), "decode_batch8_tps": batch}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    prep = sub.add_parser("prepare", help="build here what the GPU machine needs")
    prep.add_argument("--dir", type=Path, default=REPO / ".cache" / "gpu")
    prep.add_argument("--arch", default="sm_90")
    prep.add_argument("--ffi-wheel", type=Path, default=None,
                      help="apache-tvm-ffi wheel for the GPU machine's Python (default: copy this one's)")
    go = sub.add_parser("run", help="on the GPU machine")
    go.add_argument("--dir", type=Path, default=REPO / ".cache" / "gpu")
    go.add_argument("--quantization", nargs="*", default=list(QUANTS), choices=QUANTS)
    args = parser.parse_args()
    if args.mode == "prepare":
        prepare(args.dir, args.arch, args.ffi_wheel)
    else:
        run(args.dir, args.quantization)
    return 0


if __name__ == "__main__":
    sys.exit(main())
