"""The compile cache: hits, keys, corrupt entries, concurrent builders. A tiny Llama config keeps each build
to a few seconds; every test uses its own cache directory (they corrupt entries on purpose)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tvm  # this test process compiles in-process: full TVM, not the runtime-only mode
from shoal.models.compile import (
    CompiledShard,
    _read_valid_entry,
    compile_key,
    compile_shard,
    config_fingerprint,
)
from shoal.models.config import ModelConfig
from shoal.models.errors import CompileError
from shoal.models.span import LayerSpan
from shoal.models.targets import TargetSpec, detect_target, llvm_target

TINY = ModelConfig(architecture="llama", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=2,
                   num_kv_heads=1, head_dim=32, vocab_size=128, context_length=256, rope_theta=10000.0,
                   rms_eps=1e-5, tie_embeddings=True)


@pytest.fixture(scope="module")
def target() -> TargetSpec:
    return llvm_target()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, target: TargetSpec) -> Path:
    """One clean cache holding the whole tiny model, shared read-only by the tests that only look."""
    cache = tmp_path_factory.mktemp("compile-cache")
    compile_shard(TINY, LayerSpan(0, 2), target, cache=cache)
    return cache


@pytest.fixture(scope="module")
def second_span(built: Path, target: TargetSpec) -> CompiledShard:
    """Layers 1:2 built into `built` beside the whole model: one build, which the new-span test looks at and
    the corrupt-entry test copies (each build is seconds of the suite)."""
    return compile_shard(TINY, LayerSpan(1, 2), target, cache=built)


def test_second_compile_is_a_cache_hit(built: Path, target: TargetSpec) -> None:
    seen: list[tuple[float, str]] = []
    shard = compile_shard(TINY, LayerSpan(0, 2), target, cache=built,
                          progress=lambda f, m: seen.append((f, m)))
    assert shard.cached and shard.compile_seconds == 0.0
    assert shard.library.is_file() and shard.library.parent == built
    assert seen[-1][0] == 1.0 and "cached" in seen[-1][1]
    manifest = json.loads(shard.manifest.read_text())
    assert manifest["key"] == shard.key and manifest["span"] == "0:2"
    assert [p[0] for p in shard.params][:2] == ["embed_tokens.weight", "layers.0.input_layernorm.weight"]


def test_key_changes_with_span_target_and_quantization(target: TargetSpec) -> None:
    fp = config_fingerprint(TINY)
    base = compile_key(fp, LayerSpan(0, 2), "f32", target)
    assert base == compile_key(fp, LayerSpan(0, 2), "f32", target)
    other_cores = TargetSpec("llvm", {**target.attrs, "num-cores": int(target.attrs["num-cores"]) + 1})
    others = {
        compile_key(fp, LayerSpan(0, 1), "f32", target),
        compile_key(fp, LayerSpan(1, 2), "f32", target),
        compile_key(fp, LayerSpan(0, 2), "q4_1", target),
        compile_key(fp, LayerSpan(0, 2), "f32", other_cores),
        compile_key(fp, LayerSpan(0, 2), "f32", TargetSpec("cuda", {"kind": "cuda", "arch": "sm_90"})),
        compile_key(config_fingerprint(TINY.__class__(**{**TINY.to_dict(), "rope_theta": 5e5})),
                    LayerSpan(0, 2), "f32", target),
    }
    assert base not in others and len(others) == 6


def test_new_span_builds_its_own_library(built: Path, second_span: CompiledShard, target: TargetSpec) -> None:
    whole = compile_shard(TINY, LayerSpan(0, 2), target, cache=built)
    part = second_span  # compile_shard(TINY, LayerSpan(1, 2), target, cache=built) after the whole model's
    assert not part.cached and part.compile_seconds > 0
    assert part.library != whole.library and part.key != whole.key
    assert part.params[0][0] == "layers.0.input_layernorm.weight"  # no embedding: not the first span


DAMAGES = ("flip-a-byte", "truncate", "manifest-garbage", "manifest-other-key", "no-manifest")


def _damage(library: Path, manifest: Path, how: str) -> None:
    good = library.read_bytes()
    if how == "flip-a-byte":  # same size: only the recorded sha256 can tell
        library.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    elif how == "truncate":
        library.write_bytes(good[: len(good) // 2])
    elif how == "manifest-garbage":
        manifest.write_text("{not json")
    elif how == "manifest-other-key":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "key": "0" * 64}))
    else:
        manifest.unlink()


def test_corrupt_entry_is_rebuilt(tmp_path: Path, second_span: CompiledShard, target: TargetSpec) -> None:
    """Every kind of damage makes the entry invalid (checked on a fresh copy of the good entry each time, so
    one build serves them all: `second_span`'s, copied into this test's own cache); an entry with a flipped
    byte is then rebuilt in place by `compile_shard`."""
    for built_file in (second_span.library, second_span.manifest):
        shutil.copyfile(built_file, tmp_path / built_file.name)
    first = compile_shard(TINY, LayerSpan(1, 2), target, cache=tmp_path)
    assert first.cached and first.library.parent == tmp_path
    good_library, good_manifest = first.library.read_bytes(), first.manifest.read_text()
    assert _read_valid_entry(first.library, first.manifest, first.key) is not None
    for how in DAMAGES:
        first.library.write_bytes(good_library)
        first.manifest.write_text(good_manifest)
        _damage(first.library, first.manifest, how)
        assert _read_valid_entry(first.library, first.manifest, first.key) is None, \
            f"{how}: a damaged entry must not be trusted"
    first.library.write_bytes(good_library)
    first.manifest.write_text(good_manifest)
    _damage(first.library, first.manifest, "flip-a-byte")
    again = compile_shard(TINY, LayerSpan(1, 2), target, cache=tmp_path)
    assert not again.cached and again.library == first.library
    info = json.loads(again.manifest.read_text())
    assert info["key"] == again.key and info["size"] == again.library.stat().st_size
    assert compile_shard(TINY, LayerSpan(1, 2), target, cache=tmp_path).cached
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_cached_library_runs(built: Path, target: TargetSpec) -> None:
    """A library from the cache loads in the VM and runs prefill with the KV cache (random weights)."""
    from tvm.runtime import ShapeTuple
    from tvm.runtime.vm import VirtualMachine

    shard = compile_shard(TINY, LayerSpan(0, 2), target, cache=built)
    vm = VirtualMachine(tvm.runtime.load_module(str(shard.library)), tvm.cpu())
    rng = np.random.default_rng(0)
    params = [tvm.runtime.tensor((rng.standard_normal(shape) * 0.1).astype(dtype)) for _, shape, dtype in
              shard.params]
    kv = vm["create_paged_kv_cache"](ShapeTuple([1]), ShapeTuple([64]), ShapeTuple([16]), ShapeTuple([16]),
                                     ShapeTuple([0]))
    tvm.get_global_func("vm.builtin.kv_state_add_sequence")(kv, 0)
    tvm.get_global_func("vm.builtin.kv_state_begin_forward")(kv, ShapeTuple([0]), ShapeTuple([5]))
    logits = vm["prefill"](tvm.runtime.tensor(np.arange(5, dtype=np.int32).reshape(1, 5)), kv, params).numpy()
    tvm.get_global_func("vm.builtin.kv_state_end_forward")(kv)
    assert logits.shape == (1, 1, TINY.vocab_size) and np.isfinite(logits).all()


def test_two_builders_share_one_build(tmp_path: Path, target: TargetSpec) -> None:
    results = []

    def build() -> None:
        results.append(compile_shard(TINY, LayerSpan(0, 1), target, cache=tmp_path))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert sorted(r.cached for r in results) == [False, True], "the second builder must reuse the build"
    assert results[0].library == results[1].library


def test_bad_arguments(tmp_path: Path, target: TargetSpec) -> None:
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        compile_shard(TINY, LayerSpan(0, 1), target, quantization="int3", cache=tmp_path)
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        compile_shard(TINY, LayerSpan(0, 3), target, cache=tmp_path)
    with pytest.raises(ValueError, match="unknown target 'metal'"):
        detect_target("metal")
    with pytest.raises(ValueError, match="unknown target kind"):
        TargetSpec("vulkan", {})
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(CompileError, match="cannot create the compile cache directory"):
        compile_shard(TINY, LayerSpan(0, 1), target, cache=blocked / "sub")


def test_detect_target_without_gpu() -> None:
    spec = detect_target("llvm")
    assert spec.kind == "llvm" and spec.attrs["mcpu"] and int(spec.attrs["num-cores"]) >= 1
    assert spec.key == detect_target("llvm").key  # stable
    assert detect_target(spec) is spec


def test_shoal_compile_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`shoal compile` on the embedded model (the suite's shared cache: a hit once the q4_1 whole-model
    shard exists) prints the library path; bad input is a one-line error with exit code 2."""
    from shoal.mesh.commands.cli import main

    assert main(["compile", "--layers", "0:30", "--target", "llvm"]) == 0
    out, err = capsys.readouterr()
    library = Path(out.strip().splitlines()[-1])
    assert library.is_file() and library.suffix == ".so" and "-q4_1-llvm-" in library.name
    assert "layers 0:30" in err and "100.0%" in err
    assert main(["compile", "--layers", "5:99"]) == 2
    assert "exceeds the model's 30 layers" in capsys.readouterr().err
    assert main(["compile", "--model", "/nonexistent/model.gguf"]) == 2
    assert "does not exist" in capsys.readouterr().err
