"""The compile child (`compile_worker`, a real subprocess building a tiny model) is killed when its waiter is
cancelled, stopped past its time limit, and capped in memory — a compile never runs on for nobody."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from shoal.models.compile_guard import CompileCancelledError, CompileLimits, CompileScope, run_compile_work
from shoal.models.compile_worker import resolve_in_subprocess
from shoal.models.errors import CompileError
from shoal.models.span import LayerSpan

from tests.models.test_validate import LAYERS, write_llama

pytestmark = pytest.mark.timeout(300)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_child_is_killed_when_its_waiter_is_cancelled(tmp_path: Path) -> None:
    model = write_llama(tmp_path / "tiny.gguf")
    scope = CompileScope()
    task = asyncio.ensure_future(run_compile_work(
        resolve_in_subprocess, model, LayerSpan(0, LAYERS), "f32", "llvm", tmp_path / "cache", None,
        scope=scope))
    for _ in range(3000):
        if scope.pids or task.done():
            break
        await asyncio.sleep(0.01)
    assert scope.pids, "no compile child started"
    pid = scope.pids[0]
    assert not gone(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(1000):  # the worker thread reaps it right after the kill
        if gone(pid):
            break
        await asyncio.sleep(0.01)
    assert gone(pid), f"compile child {pid} still runs after its waiter was cancelled"
    assert scope.cancelled and not scope.pids
    with pytest.raises(CompileCancelledError):  # nothing new starts under a cancelled scope
        await run_compile_work(resolve_in_subprocess, model, LayerSpan(0, LAYERS), "f32", "llvm",
                               tmp_path / "cache", None, scope=scope)


def test_child_is_stopped_past_its_time_limit(tmp_path: Path) -> None:
    model = write_llama(tmp_path / "tiny.gguf")
    with pytest.raises(CompileError, match=r"took longer than 0\.2 s and was stopped"):
        resolve_in_subprocess(model, LayerSpan(0, LAYERS), "f32", "llvm", tmp_path / "cache", None,
                              limits=CompileLimits(timeout_s=0.2))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*.so"))


def test_child_is_capped_in_memory(tmp_path: Path) -> None:
    model = write_llama(tmp_path / "tiny.gguf")
    with pytest.raises(CompileError, match=r"ran out of its memory limit \(48 MiB"):
        resolve_in_subprocess(model, LayerSpan(0, LAYERS), "f32", "llvm", tmp_path / "cache", None,
                              limits=CompileLimits(max_memory_bytes=48 << 20))


def test_limits_from_the_environment() -> None:
    limits = CompileLimits.from_env({"SHOAL_COMPILE_TIMEOUT_S": "90", "SHOAL_COMPILE_MAX_MEMORY_MB": "512"})
    assert limits.timeout_s == 90 and limits.memory_bytes == 512 << 20
    assert CompileLimits.from_env({}).memory_bytes >= 2 << 30
    with pytest.raises(ValueError, match="must be numbers"):
        CompileLimits.from_env({"SHOAL_COMPILE_TIMEOUT_S": "soon"})


def test_child_exits_when_its_parent_goes(tmp_path: Path) -> None:
    """The child watches its stdin: when the parent process is gone (the pipe closes), it exits."""
    import subprocess
    import sys

    model = write_llama(tmp_path / "tiny.gguf")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.models.compile_worker", "--model", str(model), "--layers", "0:2",
         "--quantization", "f32", "--target", "llvm", "--cache", str(tmp_path / "cache")],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=120) == 3


async def test_node_load_kills_its_compile_child_when_the_request_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The finding: a client left while its model compiled, and the compile ran on. Now cancelling the
    node's load (what aiohttp does to a handler whose client went) kills the child."""
    import psutil
    from shoal.mesh.events import EventBus
    from shoal.mesh.node.model_manager import ModelManager
    from shoal.models import compile_worker

    monkeypatch.setattr(compile_worker, "runtime_only_wanted", lambda: True)  # a child even if TVM is here
    monkeypatch.delenv("TVM_USE_RUNTIME_LIB", raising=False)  # restored afterwards (use_runtime_only sets it)
    manager = ModelManager(EventBus(), backend="tvm", target="llvm", cache_dir=tmp_path / "cache")
    manager.register("tiny", write_llama(tmp_path / "tiny.gguf"))
    task = asyncio.ensure_future(manager.load("tiny"))

    def compile_children() -> list[psutil.Process]:
        return [p for p in psutil.Process().children(recursive=True)
                if "shoal.models.compile_worker" in " ".join(p.cmdline())]

    children: list[psutil.Process] = []
    for _ in range(3000):
        children = compile_children()
        if children or task.done():
            break
        await asyncio.sleep(0.01)
    assert children, "the load started no compile child"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    _, alive = await asyncio.to_thread(psutil.wait_procs, children, 5)  # killed: gone in milliseconds
    assert not alive, f"compile children still run: {[p.pid for p in alive]}"
