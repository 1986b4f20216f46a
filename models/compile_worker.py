"""Build (or find) a shard's library in a child process, so the serving process needs only TVM's runtime.

`import tvm` with the compiler costs ~190 MB of resident memory (FACTS.md); with `TVM_USE_RUNTIME_LIB=1` the
runtime alone costs a few MB. `CompiledStage.load` uses `resolve_in_subprocess` when this process has not
imported TVM yet: the child (`python -m shoal.models.compile_worker ...`) runs `compile_shard` and reports
progress and the result as JSON lines on stdout; the parent then loads the library with the runtime only.
The child is bounded in time and memory and dies with its waiter (see `compile_guard.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from shoal.models.compile import CompiledShard, Progress
from shoal.models.compile_guard import (
    MEMORY_ENV,
    TIMEOUT_ENV,
    CompileCancelledError,
    CompileLimits,
    current_scope,
)
from shoal.models.errors import CompileError
from shoal.models.span import LayerSpan
from shoal.models.targets import TargetSpec

RUNTIME_ONLY_ENV = "SHOAL_TVM_RUNTIME_ONLY"
""""0" keeps compiling in-process with the full TVM (tests that also compile in the same process)."""


def runtime_only_wanted() -> bool:
    """True when TVM is not imported yet here and the user did not opt out."""
    return "tvm" not in sys.modules and os.environ.get(RUNTIME_ONLY_ENV, "1") != "0"


def runtime_only_loaded() -> bool:
    """True when this process already imported TVM as the runtime-only library (it cannot compile)."""
    return "tvm" in sys.modules and os.environ.get("TVM_USE_RUNTIME_LIB") == "1"


def use_runtime_only() -> None:
    """Make the coming `import tvm` load only libtvm_runtime (call before TVM is first imported)."""
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"


def shard_from_manifest(manifest: Path, span: LayerSpan, quantization: str, cached: bool,
                        seconds: float) -> CompiledShard:
    info = json.loads(manifest.read_text())
    attrs = info["target"]
    return CompiledShard(
        library=manifest.with_suffix(".so"), manifest=manifest, key=info["key"], span=span,
        quantization=quantization, target=TargetSpec(str(attrs["kind"]), attrs),
        params=tuple((p[0], tuple(p[1]), p[2]) for p in info["params"]), compile_seconds=seconds,
        cached=cached,
    )


def resolve_in_subprocess(gguf_path: Path, span: LayerSpan, quantization: str, target: str | None,
                          cache: Path | None, progress: Progress | None,
                          limits: CompileLimits | None = None) -> CompiledShard:
    """Run `compile_shard` in a child process; forward its progress; return the shard it reports. The child
    is bounded by `limits` (default: from the environment) and killed when the calling work's
    `CompileScope` is cancelled (CompileCancelledError) or when this call ends in any other way."""
    limits = limits or CompileLimits.from_env()
    scope = current_scope()
    if scope is not None and scope.cancelled:
        raise CompileCancelledError("the compile was cancelled")
    cmd = [sys.executable, "-m", "shoal.models.compile_worker", "--model", str(gguf_path),
           "--layers", str(span), "--quantization", quantization, "--target", target or "auto",
           "--max-memory", str(limits.memory_bytes)]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    env = dict(os.environ)
    env.pop("TVM_USE_RUNTIME_LIB", None)  # the child needs the compiler
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryFile("w+") as errors:  # a file: a chatty child never blocks on a full pipe
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
                                env=env)
        timed_out = threading.Event()

        def kill_for_time() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(limits.timeout_s, kill_for_time)
        timer.daemon = True
        try:
            if scope is not None:
                scope.adopt(proc)
            timer.start()
            result = _read_reports(proc, progress)
        finally:
            timer.cancel()
            if scope is not None:
                scope.release(proc)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
        errors.seek(0)
        stderr = errors.read()
    if scope is not None and scope.cancelled:
        raise CompileCancelledError(f"the compile of layers {span} was cancelled (its process was killed)")
    if timed_out.is_set():
        raise CompileError(f"the compile of layers {span} took longer than {limits.timeout_s:g} s and was "
                           f"stopped (raise {TIMEOUT_ENV} if this model needs longer)")
    if proc.returncode != 0 or result is None:
        reported = str((result or {}).get("error") or "")
        if any(sign in reported + stderr for sign in _OUT_OF_MEMORY):
            raise CompileError(f"the compile of layers {span} ran out of its memory limit "
                               f"({limits.memory_bytes >> 20} MiB; {MEMORY_ENV} sets it): {reported[:200]}")
        if reported:
            raise CompileError(reported)
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        raise CompileError(f"the compile process for layers {span} failed (exit {proc.returncode}): {tail}")
    return shard_from_manifest(Path(result["manifest"]), span, quantization, bool(result["cached"]),
                               float(result["seconds"]))


_OUT_OF_MEMORY = ("MemoryError", "bad_alloc", "Cannot allocate memory", "failed to map segment",
                  "can't start new thread")
"""What a child that hit its RLIMIT_DATA says (Python, C++, the loader)."""


def _read_reports(proc: subprocess.Popen[str], progress: Progress | None) -> dict[str, Any] | None:
    """Forward the child's progress lines until it closes stdout; its final report (or None)."""
    result: dict[str, Any] | None = None
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "progress" in msg and progress:
            progress(float(msg["progress"]), str(msg["message"]))
        elif "manifest" in msg:
            result = msg
    return result


def _limit_self(max_memory: int) -> None:
    """In the child, before TVM loads: exit when the parent goes (stdin closes), and cap data memory."""

    def watch_parent() -> None:
        while os.read(0, 4096):  # unbuffered: no lock held at interpreter exit; b"" at EOF
            pass
        os._exit(3)  # the parent closed the pipe or died

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    if max_memory > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (max_memory, max_memory))


def main(argv: list[str] | None = None) -> int:
    from shoal.models.compile import compile_shard, model_fingerprint
    from shoal.models.gguf import GGUFModel
    from shoal.models.targets import detect_target

    parser = argparse.ArgumentParser(description="build one shard (used by CompiledStage.load)")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--layers", required=True)
    parser.add_argument("--quantization", required=True)
    parser.add_argument("--target", default="auto")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--max-memory", type=int, default=0, help="RLIMIT_DATA in bytes (0: none)")
    args = parser.parse_args(argv)
    _limit_self(args.max_memory)

    def report(fraction: float, message: str) -> None:
        print(json.dumps({"progress": fraction, "message": message}), flush=True)

    try:
        model = GGUFModel.open(args.model)
        span = LayerSpan.parse(args.layers, model.config.num_layers)
        from shoal.models.block_types import NATIVE, TensorTypes

        types = TensorTypes.from_gguf(model) if args.quantization == NATIVE else None
        shard = compile_shard(model.config, span, detect_target(args.target), quantization=args.quantization,
                              fingerprint=model_fingerprint(model), cache=args.cache, progress=report,
                              tensor_types=types)
    except Exception as exc:  # reported to the parent, which raises CompileError
        print(json.dumps({"manifest": None, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"manifest": str(shard.manifest), "cached": shard.cached,
                      "seconds": shard.compile_seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
