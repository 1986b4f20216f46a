"""Build one shard of a model for a target into a cached shared library.

A shard is (model architecture, layer span, quantization, target). `compile_shard` returns a `CompiledShard`
naming the library and the parameters its functions take; it builds only when the cache has no valid entry.

Cache layout (one directory, `cache_dir()`): `<name>.so` plus `<name>.json` (the manifest), where `<name>` is
readable and ends in the first 24 hex digits of the key. The key is a sha256 over: the model fingerprint
(a hash of the GGUF tensor index and config — the library depends on shapes and types, not on weight values,
and a sparse file holding one span's tensors hashes the same), the span, the quantization, the target string,
the TVM and shoal versions and a hash of the model's source files. The manifest records the key, the
library's size and sha256, and the parameter list; an entry whose manifest is missing, unreadable, for another
key, or whose library does not match its recorded hash is rebuilt. Writes go to a temp file and are renamed
into place; a lock file serialises builders of the same shard across processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from shoal.models.config import ModelConfig
from shoal.models.errors import CompileError
from shoal.models.span import LayerSpan
from shoal.models.targets import TargetSpec
from shoal.models.weights import QUANTIZATIONS

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
"""`progress(fraction in [0, 1], message)`."""

MANIFEST_VERSION = 1
_SOURCE_FILES = ("llama.py", "compile.py", "schedule.py", "weights.py", "block_types.py", "native.py",
                 "sliding_prefill.py", "sliding_cache.py")
_SOURCE_DIRS = ("kernels",)
"""models/kernels also supplies the CPU attention and RoPE kernels, so every build depends on it."""


def cache_dir() -> Path:
    """`$SHOAL_COMPILE_CACHE`, else `<user data dir>/shoal/compile`."""
    env = os.environ.get("SHOAL_COMPILE_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("shoal")) / "compile"


def shoal_version() -> str:
    """The installed distribution's version, else the checkout's pyproject.toml version."""
    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib

        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "0+unknown"


def tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def source_hash(quantization: str = "f32") -> str:
    """sha256 over the sources a build depends on (llama.py, compile.py, schedule.py, weights.py and
    models/kernels/*.py)."""
    here = Path(__file__).resolve().parent
    files = [here / name for name in _SOURCE_FILES]
    del quantization  # every build uses models/kernels (attention kernels on llvm, matmuls when quantized)
    for folder in _SOURCE_DIRS:
        files.extend(sorted((here / folder).glob("*.py")))
    h = hashlib.sha256()
    for path in files:
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def model_fingerprint(gguf_model: Any) -> str:
    """sha256 of the GGUF's tensor index (names, types, shapes) and its config: what a library depends on."""
    h = hashlib.sha256()
    h.update(json.dumps(gguf_model.config.to_dict(), sort_keys=True).encode())
    for name, info in gguf_model.index.tensors.items():
        h.update(f"{name}|{int(info.type)}|{list(info.shape)}\n".encode())
    return h.hexdigest()


def config_fingerprint(config: ModelConfig) -> str:
    """A fingerprint from the config alone, for callers without a GGUF (f32 only depends on shapes)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


def compile_key(fingerprint: str, span: LayerSpan, quantization: str, target: TargetSpec) -> str:
    parts = {
        "model": fingerprint,
        "span": str(span),
        "quantization": quantization,
        "target": target.key,
        "tvm": tvm_version(),
        "shoal": shoal_version(),
        "source": source_hash(quantization),
        "manifest": MANIFEST_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CompiledShard:
    """A built shard: its library and the parameters (name, shape, dtype) its functions take, in order."""

    library: Path
    manifest: Path
    key: str
    span: LayerSpan
    quantization: str
    target: TargetSpec
    params: tuple[tuple[str, tuple[int, ...], str], ...]
    compile_seconds: float
    """Seconds the build took (0.0 when served from the cache)."""
    cached: bool


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry_name(config: ModelConfig, span: LayerSpan, quantization: str, target: TargetSpec, key: str) -> str:
    return f"{config.architecture}-L{span.start}-{span.stop}-{quantization}-{target.kind}-{key[:24]}"


def _read_valid_entry(so: Path, manifest: Path, key: str) -> dict[str, Any] | None:
    """The manifest when the entry is complete and intact, else None (and say why in the log)."""
    if not so.is_file() or not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text())
        if info.get("key") != key:
            logger.warning("compile cache entry %s is for another key; rebuilding", so.name)
            return None
        if so.stat().st_size != info["size"] or _file_sha256(so) != info["sha256"]:
            logger.warning("compile cache entry %s is corrupt (size or hash differs); rebuilding", so.name)
            return None
        return info
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("compile cache manifest %s is unreadable; rebuilding", manifest.name)
        return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl where available; elsewhere builds may race, harmlessly: renames)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pipeline(target: TargetSpec, tvm_target: Any, quantization: str, progress: Progress | None) -> Any:
    import tvm
    from shoal.models.kernels.pipeline import with_safe_reshape_rewrite
    from shoal.models.schedule import cpu_schedule_pass, mark_hand_written_pass, primfunc_names

    if target.kind == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend

    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: Any, _ctx: Any) -> Any:
        with tvm_target:
            # On cuda, dlight's GPU rules run inside the backend's legalize passes.
            hand_written = primfunc_names(mod)
            schedule = [] if target.kind == "cuda" else [cpu_schedule_pass(hand_written)]
            # Stock RewriteDataflowReshape asserts on hand-written (non-sblock) PrimFuncs; models/kernels'
            # version stubs them out while it runs, so reshapes stay zero-copy views.
            lower = with_safe_reshape_rewrite(backend.dataflow_lower_passes(tvm_target))
            mark = [mark_hand_written_pass(gpu=target.kind == "cuda")]
            stages = [
                ("dispatch", mark + backend.library_dispatch_passes(tvm_target)),
                ("legalize and fuse", backend.legalize_passes(tvm_target)),
                ("schedule", schedule),
                ("lower", lower + backend.finalize_passes(tvm_target)),
            ]
            for i, (label, passes) in enumerate(stages):
                if progress:
                    progress(0.1 + 0.5 * i / len(stages), f"relax: {label}")
                mod = tvm.transform.Sequential(passes)(mod)
        if progress:
            progress(0.6, "LLVM code generation")
        return mod

    return pipeline


def _build(config: ModelConfig, span: LayerSpan, quantization: str, target: TargetSpec,
           so: Path, progress: Progress | None,
           tensor_types: Any = None) -> list[tuple[str, tuple[int, ...], str]]:
    import tvm
    from shoal.models.llama import export_shard

    if progress:
        progress(0.02, f"exporting layers {span} ({quantization})")
    tvm_target = target.tvm_target()
    if target.kind == "cuda":
        # Registers `tvm_callback_cuda_compile`, so kernels are compiled into the library now (a fatbin with
        # nvcc where present) instead of being left as CUDA source for the loading machine to compile.
        import tvm.support.nvcc

        if shutil.which("nvcc"):
            os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    mod, named_params = export_shard(config, span, tvm_target, quantization, tensor_types)
    params = [(name, tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in named_params]
    pipeline = _pipeline(target, tvm_target, quantization, progress)
    executable = tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline)
    if progress:
        progress(0.85, "linking the shared library")
    _atomic_write_bytes(so, lambda tmp: executable.export_library(str(tmp)))
    return params


def compile_shard(
    config: ModelConfig,
    span: LayerSpan,
    target: TargetSpec,
    *,
    quantization: str = "f32",
    fingerprint: str | None = None,
    cache: Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
    tensor_types: Any = None,
) -> CompiledShard:
    """The library for this shard: from the cache when a valid entry exists, else built and cached.

    `fingerprint` is `model_fingerprint(gguf_model)` (default: `config_fingerprint(config)`; it covers every
    tensor's block type, so a native build's key does too). `tensor_types`
    (`block_types.TensorTypes.from_gguf(gguf_model)`) is required for quantization="native".
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "native" and (tensor_types is None or fingerprint is None):
        raise ValueError("a native build needs the GGUF's tensor types and model fingerprint")
    span.check(config.num_layers)
    folder = Path(cache) if cache is not None else cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompileError(f"cannot create the compile cache directory {folder}: {exc}") from exc
    key = compile_key(fingerprint or config_fingerprint(config), span, quantization, target)
    name = _entry_name(config, span, quantization, target, key)
    so, manifest = folder / f"{name}.so", folder / f"{name}.json"

    def done(info: dict[str, Any], seconds: float, cached: bool) -> CompiledShard:
        if progress:
            progress(1.0, f"{'cached' if cached else 'built'} {so}")
        return CompiledShard(
            library=so, manifest=manifest, key=key, span=span, quantization=quantization, target=target,
            params=tuple((p[0], tuple(p[1]), p[2]) for p in info["params"]),
            compile_seconds=seconds, cached=cached,
        )

    if not force and (info := _read_valid_entry(so, manifest, key)) is not None:
        return done(info, 0.0, True)
    with _file_lock(folder / f"{name}.lock"):
        # Another process may have built it while we waited for the lock.
        if not force and (info := _read_valid_entry(so, manifest, key)) is not None:
            return done(info, 0.0, True)
        manifest.unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            params = _build(config, span, quantization, target, so, progress, tensor_types)
        except CompileError:
            raise
        except Exception as exc:
            raise CompileError(f"building layers {span} for {target.kind} failed: {exc}") from exc
        seconds = time.perf_counter() - start
        info = {
            "key": key, "span": str(span), "quantization": quantization, "target": target.attrs,
            "tvm": tvm_version(), "shoal": shoal_version(), "size": so.stat().st_size,
            "sha256": _file_sha256(so), "params": [list(p) for p in params],
            "compile_seconds": round(seconds, 3),
        }
        _atomic_write_bytes(manifest, lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
        logger.info("compiled layers %s (%s, %s) in %.1f s -> %s", span, quantization, target.kind, seconds,
                    so)
        return done(info, seconds, False)
