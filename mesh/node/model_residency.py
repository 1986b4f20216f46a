"""Which models stay loaded, and for how long: the node's memory budget, `keep_alive` and idle unloading.

The model manager keeps one `Resident` per model it has loaded or is loading (keyed by the model's canonical
name, so aliases and the CID share it). A resident's `need` is `shoal.models.memory`'s estimate for the
whole-model stage the node builds (weights as the build keeps them, the KV cache at the serving size,
workspace). Before a load, `pick_victims` chooses the idle models to unload (least recently used first) so
the need fits the budget; None when even that is not enough.

A model is *busy* while requests hold it (`holds`, taken by the API for a request's whole life), shortly
after it was handed out (`ACQUIRE_GRACE_S`: the time between `acquire` and the request reaching the engine
or its hold), or while its engine has requests. Busy models are never unloaded. An idle model's
`keep_alive_s` runs from its last use: negative keeps it loaded, 0 unloads it as soon as it is idle.
`IdleReaper` is the one task that unloads expired models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shoal.models.errors import ModelFileError
from shoal.models.memory import memory_need
from shoal.models.span import LayerSpan

logger = logging.getLogger(__name__)

LOADING = "loading"
LOADED = "loaded"
AVAILABLE = "available"
FOREVER = -1.0
ACQUIRE_GRACE_S = 5.0
"""How long a model handed out by `acquire` counts as busy when no hold follows (an offloaded request on its
way to the engine, an embedding, `/api/show`)."""
BUSY_RECHECK_S = 1.0
"""How often the reaper looks again at a busy model whose keep_alive is finite."""


@dataclass
class Resident:
    """A model loaded (or loading) on this node, as the budget and the reaper see it."""

    name: str
    need: int
    """Estimated bytes (`estimate_need`)."""
    keep_alive_s: float
    """Idle seconds before it is unloaded; negative: never; set by each request (or the node default)."""
    state: str = LOADING
    holds: int = 0
    """Requests using it now (`ModelManager.hold`)."""
    last_used: float = field(default_factory=time.monotonic)
    """`time.monotonic()` of the last use (a hold released, an acquire, the engine seen busy)."""
    acquired: list[float] = field(default_factory=list)
    """`time.monotonic()` of recent acquires not yet followed by a hold."""

    def note_acquired(self, now: float) -> None:
        self.acquired = [*[t for t in self.acquired if now - t < ACQUIRE_GRACE_S][-63:], now]
        self.last_used = now

    def pending(self, now: float) -> bool:
        """An acquire within the grace period that no hold has claimed yet."""
        self.acquired = [t for t in self.acquired if now - t < ACQUIRE_GRACE_S]
        return bool(self.acquired)

    def claim(self) -> None:
        """A hold starts: it stands for the oldest pending acquire."""
        if self.acquired:
            self.acquired.pop(0)

    def expires_at(self, now: float, busy: bool) -> float | None:
        """Wall-clock time (`time.time()`) it unloads if it stays idle; None: never (kept loaded)."""
        if self.keep_alive_s < 0:
            return None
        since = now if busy else self.last_used
        return time.time() + (since + self.keep_alive_s - now)


def estimate_need(path: Path, backend: str, *, cache_tokens: int, max_batch: int, context: int | None) -> int:
    """Blocking (reads the GGUF header): bytes the whole-model stage the node builds will take — quantized
    weights and a `cache_tokens` KV pool for `tvm`, fp32 weights and a context-sized cache for `numpy`."""
    from shoal.models.gguf import read_gguf_index

    try:
        with Path(path).open("rb") as fh:
            def read(offset: int, n: int) -> bytes:
                fh.seek(offset)
                return fh.read(n)

            index = read_gguf_index(read)
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file {path}: {exc.strerror or exc}") from None
    config = index.config
    span = LayerSpan.whole(config.num_layers)
    if backend == "numpy":
        tokens = min(context or config.context_length, config.context_length)
        return memory_need(index, span, tokens, quantization="f32").total
    tokens = min(cache_tokens, config.context_length * max_batch)
    return memory_need(index, span, tokens, quantization="auto", sequences=max_batch).total


def pick_victims(
    residents: Iterable[Resident], need: int, budget: int, busy: Callable[[Resident], bool]
) -> list[Resident] | None:
    """The idle loaded models to unload, least recently used first, so that `need` more bytes fit in
    `budget`: [] when it fits already, None when unloading every idle one would not make room. Models kept
    loaded (negative keep_alive), busy ones and ones still loading are never chosen."""
    residents = list(residents)
    used = sum(r.need for r in residents)
    if used + need <= budget:
        return []
    idle = [r for r in residents if r.state == LOADED and r.keep_alive_s >= 0 and not busy(r)]
    victims: list[Resident] = []
    for resident in sorted(idle, key=lambda r: r.last_used):
        victims.append(resident)
        used -= resident.need
        if used + need <= budget:
            return victims
    return None


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def budget_message(name: str, need: int, budget: int, residents: Iterable[Resident],
                   busy: Callable[[Resident], bool]) -> tuple[str, bool]:
    """The refusal's text, and whether waiting could help (some loaded model is busy or still loading)."""
    others = list(residents)
    if need > budget:
        return (f"the model '{name}' needs about {mib(need)}, more than this node's whole memory budget of "
                f"{mib(budget)}; raise [models] memory_budget_mb or lower [models] cache_tokens"), False
    parts = []
    waiting = False
    for r in others:
        why = ("loading" if r.state == LOADING else "serving requests" if busy(r)
               else "kept loaded" if r.keep_alive_s < 0 else "idle")
        waiting = waiting or why in ("loading", "serving requests")
        parts.append(f"'{r.name}' ({mib(r.need)}, {why})")
    loaded = ", ".join(parts) or "nothing"
    return (f"the model '{name}' needs about {mib(need)} but the memory budget of {mib(budget)} holds "
            f"{loaded}; try again when a model is idle, unload one (POST /v1/models/ID/unload) or raise "
            "[models] memory_budget_mb"), waiting


class IdleReaper:
    """The task that unloads models whose keep_alive has run out. `wake()` after anything that changes a
    deadline (a hold released, a keep_alive set); `stop()` cancels it (idempotent)."""

    def __init__(self, residents: Callable[[], Iterable[Resident]], busy: Callable[[Resident], bool],
                 unload: Callable[[str], Awaitable[object]]) -> None:
        self._residents = residents
        self._busy = busy
        self._unload = unload
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="model-idle-reaper")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self.sweep()
            except Exception:  # the task's boundary: log, keep reaping
                logger.exception("unloading an idle model failed")
                delay = BUSY_RECHECK_S
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def sweep(self) -> float | None:
        """Unload the expired idle models; the seconds until the next deadline (None: none pending)."""
        now = time.monotonic()
        delays: list[float] = []
        for resident in list(self._residents()):
            if resident.state != LOADED or resident.keep_alive_s < 0:
                continue
            if self._busy(resident):
                resident.last_used = now
                delays.append(BUSY_RECHECK_S)
                continue
            due = resident.last_used + resident.keep_alive_s
            if due <= now:
                logger.info("unloading %s: idle for %.1f s (keep_alive %.1f s)", resident.name,
                            now - resident.last_used, resident.keep_alive_s)
                await self._unload(resident.name)
            else:
                delays.append(due - now)
        return min(delays) if delays else None


def default_budget() -> int:
    """Half the machine's RAM (`[models] memory_budget_mb` unset)."""
    import psutil

    return int(psutil.virtual_memory().total // 2)
