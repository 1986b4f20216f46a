"""Bounds of a compile child (`compile_worker`): time, memory, and nobody waiting.

- `CompileLimits`: the child's wall-clock limit (the parent kills it past that) and its memory cap
  (`RLIMIT_DATA`, set by the child on itself before importing TVM: heap and anonymous mappings, i.e. what
  grows with a runaway compile, but not the address space a GPU driver reserves). From the environment:
  `SHOAL_COMPILE_TIMEOUT_S`, `SHOAL_COMPILE_MAX_MEMORY_MB`.
- `CompileScope` and `run_compile_work`: blocking work that may start compile children runs in a thread
  under a scope; when the awaiting task is cancelled (the client left, the node stops) the scope kills the
  children at once, so no compile runs on for nobody. The scope travels to the thread in a contextvar.
- A child also exits by itself when its stdin closes, i.e. when the parent process is gone (even `kill -9`).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

TIMEOUT_ENV = "SHOAL_COMPILE_TIMEOUT_S"
MEMORY_ENV = "SHOAL_COMPILE_MAX_MEMORY_MB"
T = TypeVar("T")


def _default_memory() -> int:
    """Half the machine's memory, at least 2 GiB (a 30-layer compile peaks well under 1 GiB here)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(2 << 30, total // 2)


@dataclass(frozen=True)
class CompileLimits:
    timeout_s: float = 3600.0
    """Wall-clock seconds one compile child may run before it is killed (CompileError)."""
    max_memory_bytes: int = 0
    """Cap of the child's data memory (`RLIMIT_DATA`); 0: half the machine's memory, at least 2 GiB."""

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"compile timeout must be positive, not {self.timeout_s}")
        if self.max_memory_bytes < 0:
            raise ValueError(f"compile memory cap must be >= 0 bytes, not {self.max_memory_bytes}")

    @property
    def memory_bytes(self) -> int:
        return self.max_memory_bytes or _default_memory()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> CompileLimits:
        env = os.environ if environ is None else environ
        try:
            timeout = float(env.get(TIMEOUT_ENV) or cls.timeout_s)
            memory = int(float(env.get(MEMORY_ENV) or 0) * (1 << 20))
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} and {MEMORY_ENV} must be numbers") from None
        return cls(timeout_s=timeout, max_memory_bytes=memory)


class CompileCancelledError(Exception):
    """The compile was cancelled: nobody waits for it any more (its child was killed)."""


class CompileScope:
    """Compile children started under this scope; `cancel()` kills them and refuses new ones. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen[Any]] = set()
        self.cancelled = False

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs]

    def adopt(self, proc: subprocess.Popen[Any]) -> None:
        """Track a started child; if the scope is already cancelled, kill it (CompileCancelledError)."""
        with self._lock:
            if not self.cancelled:
                self._procs.add(proc)
                return
        proc.kill()
        raise CompileCancelledError("the compile was cancelled")

    def release(self, proc: subprocess.Popen[Any]) -> None:
        with self._lock:
            self._procs.discard(proc)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


_SCOPE: contextvars.ContextVar[CompileScope | None] = contextvars.ContextVar("shoal_compile_scope",
                                                                            default=None)


def current_scope() -> CompileScope | None:
    """The scope of the work running in this thread (None outside `run_compile_work`)."""
    return _SCOPE.get()


async def run_compile_work(fn: Callable[..., T], *args: Any, scope: CompileScope | None = None) -> T:
    """`fn(*args)` in a worker thread under a `CompileScope`: cancelling the awaiting task kills the compile
    children `fn` started (the thread then ends with CompileCancelledError, which nobody reads)."""
    scope = scope or CompileScope()
    context = contextvars.copy_context()
    context.run(_SCOPE.set, scope)
    future = asyncio.get_running_loop().run_in_executor(None, context.run, fn, *args)
    try:
        return await future
    except asyncio.CancelledError:
        scope.cancel()
        raise
