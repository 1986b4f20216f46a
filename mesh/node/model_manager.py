"""Which models this node has, and loading them into a running `Engine` (and unloading them again).

Loading reads the GGUF, builds (compiles, or finds in the cache) one stage covering every layer, and starts
an `Engine` over it. All blocking work runs in an executor thread; progress is logged and published as
`compile.progress` / `compile.done` / `model.loaded` / `model.unloaded` events.

Several models may be loaded at once within the node's memory budget; a model is loaded on first use
(`acquire`), unloaded when idle past its `keep_alive`, and unloaded to make room for another (least recently
used, idle ones only) — the bookkeeping is `model_residency`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shoal.mesh.events import EventBus
from shoal.mesh.node.model_loading import (
    LoadFn,
    LoadOptions,
    LocalModel,
    ServingLimits,
    close_stages,
    compile_span,
    load_engine,
    note_target,
)
from shoal.mesh.node.model_residency import (
    AVAILABLE,
    FOREVER,
    LOADED,
    IdleReaper,
    Resident,
    budget_message,
    default_budget,
    estimate_need,
    pick_victims,
)
from shoal.models.compile_guard import run_compile_work
from shoal.models.embedded import DEFAULT_MODEL_NAME, embedded_model_path
from shoal.models.errors import ModelError, ModelMemoryBudgetError, ModelNotFoundError
from shoal.models.loader import resolve_backend
from shoal.models.served import ServedModel

__all__ = ["LoadFn", "LoadOptions", "LocalModel", "ModelManager", "ModelNotFoundError", "ServingLimits",
           "load_engine"]

logger = logging.getLogger(__name__)


class ModelManager:
    """The node's models: the catalog of local files and the engines currently loaded."""

    def __init__(
        self,
        bus: EventBus,
        *,
        backend: str = "tvm",
        target: str | None = None,
        cache_dir: Path | None = None,
        max_batch: int = 8,
        limits: ServingLimits | None = None,
        load_fn: LoadFn = load_engine,
        on_progress: Callable[[float, str], None] | None = None,
        catalog: Callable[[], list[dict[str, Any]]] | None = None,
        memory_budget: int | None = None,
        keep_alive_s: float = 300.0,
        keep_loaded: str | None = None,
    ) -> None:
        """`catalog` lists models held elsewhere on this node (the IPFS store: dicts with `names`, `cid`,
        `path`, `complete`); complete ones become servable under each of their names and their CID.
        `memory_budget`: bytes the loaded models may take together (None: half the RAM); `keep_alive_s`: idle
        seconds before a model is unloaded (negative: never; needs `start()`); `keep_loaded`: a model (the
        node's default) whose keep_alive is forever unless a request sets its own."""
        self._catalog = catalog
        self._bus = bus
        self._on_progress = on_progress
        self.backend = backend
        self.target = target
        self.cache_dir = cache_dir
        self.max_batch = max_batch
        self.limits = limits or ServingLimits()
        self._load_fn = load_fn
        self._models: dict[str, LocalModel] = {}
        self._served: dict[str, ServedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.memory_budget = default_budget() if memory_budget is None else memory_budget
        self.keep_alive_s = keep_alive_s
        self.keep_loaded = keep_loaded
        self._residents: dict[str, Resident] = {}
        self._room = asyncio.Lock()
        """Taken to decide whether a model fits (and to unload idle ones for it), so two loads never both
        count on the same free room."""
        self._reaper = IdleReaper(self._residents.values, self._busy, self._unload_idle)
        self.hosted: Callable[[], int] = lambda: 0
        """Bytes the same budget holds outside the loaded models: the spans in use on the node's stage host
        (set by the split service, `mesh.split.held_spans`); a load fits only in what they leave."""

    # --- catalog ---------------------------------------------------------------------------------------

    def add_embedded(self) -> None:
        self.register(DEFAULT_MODEL_NAME, embedded_model_path(), pinned=True)

    def register(
        self, name: str, path: Path, cid: str | None = None, pinned: bool = False, size: int | None = None
    ) -> LocalModel:
        """Make a local GGUF file servable under `name` (used for the embedded model and pulled models)."""
        if size is None:
            try:
                size = Path(path).stat().st_size
            except OSError:
                size = 0
        model = LocalModel(name=name, path=Path(path), cid=cid, pinned=pinned, size=size)
        self._models[name] = model
        return model

    def set_cid(self, name: str, cid: str) -> None:
        self.resolve(name).cid = cid

    def refresh(self) -> None:
        """Pick up models the catalog holds (e.g. pulled since the last call). Reads small files."""
        if self._catalog is not None:
            self.apply_catalog(self._catalog())

    async def refresh_async(self) -> None:
        """`refresh` with the catalog read in a worker thread (the event loop never touches the disk)."""
        if self._catalog is not None:
            self.apply_catalog(await asyncio.to_thread(self._catalog))

    def apply_catalog(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            if not entry.get("complete") or not entry.get("path"):
                continue
            for name in entry.get("names") or [entry["cid"]]:
                current = self._models.get(name)
                if current is None:
                    self.register(
                        name,
                        Path(entry["path"]),
                        cid=entry["cid"],
                        pinned=bool(entry.get("pinned")),
                        size=int(entry.get("size") or 0),
                    )
                elif current.cid is None:
                    current.cid = entry["cid"]

    def resolve(self, name_or_cid: str) -> LocalModel:
        model = self._find(name_or_cid)
        if model is None:
            self.refresh()
            model = self._find(name_or_cid)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"the model '{name_or_cid}' does not exist on this node (have: {known})")
        return model

    def _find(self, name_or_cid: str) -> LocalModel | None:
        model = self._models.get(name_or_cid)
        if model is None:
            model = next((m for m in self._models.values() if m.cid and m.cid == name_or_cid), None)
        return model

    def _canonical(self, model: LocalModel) -> LocalModel:
        """The first registered entry for the same model (same CID, or same file): every alias, and the CID,
        load and serve one engine under that entry's name."""
        for other in self._models.values():
            if other is model or (model.cid and other.cid == model.cid) or other.path == model.path:
                return other
        return model

    def list_models(self) -> list[dict[str, Any]]:
        """The OpenAI model list entries (call `refresh`/`refresh_async` first to see new pulls), each with
        its residency (`residency`)."""
        return [
            {
                "id": m.name,
                "object": "model",
                "created": m.created,
                "owned_by": "shoal",
                "shoal": {
                    "cid": m.cid,
                    "size": m.size,
                    "pinned": m.pinned,
                    "compiled_targets": list(m.compiled_targets),
                    **self.residency(m.name),
                },
            }
            for m in self._models.values()
        ]

    def residency(self, name: str) -> dict[str, Any]:
        """`state` (`loaded`, `loading` or `available`), `loaded`, `memory` (estimated bytes, when loaded or
        loading), `keep_alive` (seconds, -1: kept loaded), `expires_at` (Unix time it unloads if it stays
        idle; None: never or not loaded) and `requests` (in flight) of `name` (an alias reports its model)."""
        model = self._find(name)
        resident = self._residents.get(self._canonical(model).name) if model is not None else None
        if resident is None:
            return {"state": AVAILABLE, "loaded": False, "memory": None, "context_length": None,
                    "keep_alive": None, "expires_at": None, "requests": 0}
        busy = self._busy(resident)
        expires = resident.expires_at(time.monotonic(), busy) if resident.state == LOADED else None
        served = self._served.get(resident.name)
        engine = served.engine if served is not None else None
        requests = max(resident.holds, engine.active_count + engine.queue_depth if engine is not None else 0)
        return {"state": resident.state, "loaded": resident.state == LOADED, "memory": resident.need,
                "context_length": served.context_length if served is not None else None,
                "keep_alive": resident.keep_alive_s,
                "expires_at": None if expires is None else round(expires, 3),
                "requests": requests}

    def memory_used(self) -> int:
        """Estimated bytes of the models loaded and loading (of `memory_budget`)."""
        return sum(r.need for r in self._residents.values())

    def memory(self) -> dict[str, int]:
        """`budget`, `used` (the loaded models) and `hosted` (spans in use on the stage host): bytes."""
        return {"budget": self.memory_budget, "used": self.memory_used(), "hosted": self.hosted()}

    def compiled_targets(self) -> list[str]:
        """Target kinds (`llvm`, `cuda`) the loaded models were compiled for, in first-seen order."""
        kinds: list[str] = []
        for model in self._models.values():
            kinds += [kind for kind in model.compiled_targets if kind not in kinds]
        return kinds

    def loaded_names(self) -> list[str]:
        return list(self._served)

    def served(self, name: str) -> ServedModel | None:
        return self._served.get(name)

    def waiting(self) -> int:
        """Requests queued for a batch slot."""
        return sum(s.engine.queue_depth for s in self._served.values())

    def kv_usage(self) -> tuple[int, int]:
        """KV-cache tokens (reserved by running requests, held) over the loaded engines."""
        engines = [s.engine for s in self._served.values()]
        return sum(e.kv_reserved for e in engines), sum(e.admission.capacity for e in engines)

    def active_sequences(self) -> int:
        """Requests the engines hold (waiting, in prefill or in decode)."""
        return sum(s.engine.active_count + s.engine.queue_depth for s in self._served.values())

    # --- lifecycle -------------------------------------------------------------------------------------

    def _progress(self, name: str) -> Callable[..., None]:
        last = [-1.0]

        def report(fraction: float, message: str = "", span: str | None = None) -> None:
            self._bus.publish("compile.progress", model=name, span=span, fraction=fraction, message=message)
            if self._on_progress is not None:
                self._on_progress(fraction, message)
            if fraction - last[0] >= 0.1 or fraction >= 1.0:
                last[0] = fraction
                logger.info("preparing %s: %3.0f%% %s", name, fraction * 100, message)

        return report

    # --- residency -------------------------------------------------------------------------------------

    def _default_keep_alive(self, name: str) -> float:
        keep = self._find(self.keep_loaded) if self.keep_loaded else None
        if keep is not None and self._canonical(keep).name == name:
            return FOREVER
        return FOREVER if self.keep_alive_s < 0 else self.keep_alive_s

    def _busy(self, resident: Resident) -> bool:
        if resident.holds > 0 or resident.pending(time.monotonic()):
            return True
        served = self._served.get(resident.name)
        return served is not None and served.engine.active_count + served.engine.queue_depth > 0

    def _resident(self, name: str) -> Resident | None:
        model = self._find(name)
        return self._residents.get(self._canonical(model).name) if model is not None else None

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        """Mark `name` in use for the block (one request's life): it is not unloaded meanwhile, and its
        keep_alive runs from the end. A name this node has not loaded (a peer's model) holds nothing."""
        resident = self._resident(name)
        if resident is None:
            yield
            return
        resident.holds += 1
        resident.claim()
        try:
            yield
        finally:
            resident.holds -= 1
            resident.last_used = time.monotonic()
            self._reaper.wake()

    def set_keep_alive(self, name: str, seconds: float | None) -> None:
        """A request's own keep_alive for `name` (None: the node's default), from now until the next request
        sets another (Ollama's rule); negative keeps it loaded."""
        resident = self._resident(name)
        if resident is not None:
            resident.keep_alive_s = self._default_keep_alive(resident.name) if seconds is None else (
                FOREVER if seconds < 0 else seconds)
            self._reaper.wake()

    async def acquire(self, name: str, keep_alive: float | None = None) -> ServedModel:
        """The served model `name`, loading it first if needed (ModelNotFoundError if unknown;
        ModelMemoryBudgetError if it does not fit). Counts as a use: its keep_alive becomes `keep_alive`
        (None: the node's default) and restarts."""
        model = self._canonical(self.resolve(name))
        served = self._served.get(model.name)
        if served is None:
            served = await self.load(name)
        resident = self._residents.get(model.name)
        if resident is not None:
            resident.note_acquired(time.monotonic())
            resident.keep_alive_s = self._default_keep_alive(model.name) if keep_alive is None else (
                FOREVER if keep_alive < 0 else keep_alive)
            self._reaper.wake()
        return served

    async def release(self, name: str) -> bool:
        """keep_alive 0 from now (Ollama's unload request): unload `name` at once when no request holds it
        and its engine is idle (True), else when they end. An acquire not yet followed by its request does
        not keep it."""
        resident = self._resident(name)
        if resident is None:
            return False
        resident.keep_alive_s = 0.0
        resident.acquired.clear()
        unloaded = await self._unload_idle(resident.name, reason="keep_alive")
        self._reaper.wake()
        return unloaded

    async def _make_room(self, model: LocalModel) -> Resident:
        """Reserve `model`'s estimated memory (unloading idle models, least recently used first, as needed);
        ModelMemoryBudgetError when it cannot fit."""
        need = await asyncio.to_thread(
            estimate_need, model.path, resolve_backend(self.backend), cache_tokens=self.limits.cache_tokens,
            max_batch=self.max_batch, context=self.limits.context)
        async with self._room:
            for _ in range(8):  # a chosen model may turn busy before it is unloaded: choose again
                others = list(self._residents.values())
                budget = self.memory_budget - self.hosted()  # spans in use for splits hold the rest
                victims = pick_victims(others, need, budget, self._busy)
                if victims is None:
                    message, retryable = budget_message(model.name, need, budget, others, self._busy)
                    logger.warning("not loading %s: %s", model.name, message)
                    raise ModelMemoryBudgetError(message, retryable=retryable)
                if not victims:
                    break
                for victim in victims:
                    logger.info("unloading %s (idle) to make room for %s", victim.name, model.name)
                    await self._unload_idle(victim.name, reason="memory_budget")
            resident = Resident(model.name, need, self._default_keep_alive(model.name))
            self._residents[model.name] = resident
            return resident

    async def _unload_idle(self, name: str, reason: str = "keep_alive") -> bool:
        """Unload `name` if it is still loaded and idle (the reaper's and the budget's way)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            resident = self._residents.get(name)
            if resident is None or resident.state != LOADED or self._busy(resident):
                return False
            return await self._unload_locked(name, reason)

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start unloading idle models (call on the node's event loop)."""
        self._reaper.start()

    async def load(self, name: str) -> ServedModel:
        model = self._canonical(self.resolve(name))
        lock = self._locks.setdefault(model.name, asyncio.Lock())
        async with lock:
            served = self._served.get(model.name)
            if served is not None:
                return served
            resident = await self._make_room(model)
            try:
                served = await self._load_locked(model)
            except BaseException:
                self._residents.pop(model.name, None)
                raise
            resident.state = LOADED
            resident.last_used = time.monotonic()
            self._reaper.wake()
            return served

    async def _load_locked(self, model: LocalModel) -> ServedModel:
        logger.info("loading %s from %s (backend %s)", model.name, model.path, self.backend)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        options = LoadOptions(self.backend, self.target, self.cache_dir, self.max_batch, self.limits)
        # A compile child dies with this waiter (a client that leaves, a node that stops).
        served = await run_compile_work(self._load_fn, model, options, self._progress(model.name))
        try:
            await served.engine.start()
        except BaseException:
            await loop.run_in_executor(None, close_stages, served)
            raise
        for stage in served.stages:
            note_target(model, stage)
        self._served[model.name] = served
        elapsed = time.perf_counter() - started
        self._bus.publish("compile.done", model=model.name, span=None, seconds=round(elapsed, 3))
        self._bus.publish("model.loaded", model=model.name)
        logger.info("loaded %s in %.1f s", model.name, elapsed)
        return served

    async def compile(
        self, name: str, target: str | None = None, layers: str | None = None
    ) -> dict[str, Any]:
        """Build (or find cached) the library for `layers` of `name` without serving it."""
        model = self.resolve(name)
        started = time.perf_counter()
        result = await run_compile_work(compile_span, model, target or self.target, layers, self.cache_dir,
                                        self._progress(model.name))
        result["target"] = target or "auto"
        seconds = round(time.perf_counter() - started, 3)
        self._bus.publish("compile.done", model=model.name, span=result["layers"], seconds=seconds)
        return result

    async def unload(self, name: str, reason: str = "request") -> bool:
        model = self._canonical(self.resolve(name))
        lock = self._locks.setdefault(model.name, asyncio.Lock())
        async with lock:
            return await self._unload_locked(model.name, reason)

    async def _unload_locked(self, name: str, reason: str) -> bool:
        served = self._served.pop(name, None)
        self._residents.pop(name, None)
        if served is None:
            return False
        await served.engine.stop()
        await asyncio.get_running_loop().run_in_executor(None, close_stages, served)
        self._bus.publish("model.unloaded", model=name, reason=reason)
        logger.info("unloaded %s (%s)", name, reason)
        return True

    async def stop(self) -> None:
        await self._reaper.stop()
        for name in list(self._served):
            try:
                await self.unload(name)
            except ModelError:
                logger.exception("unloading %s failed", name)
