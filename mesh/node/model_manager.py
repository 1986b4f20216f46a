"""Which models this node has, and loading them into a running `Engine` (and unloading them again).

Loading reads the GGUF, builds (compiles, or finds in the cache) one stage covering every layer, and starts
an `Engine` over it. All blocking work runs in an executor thread; progress is logged and published as
`compile.progress` / `compile.done` / `model.loaded` / `model.unloaded` events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.mesh.events import EventBus
from shoal.mesh.node.config import DEFAULT_CACHE_TOKENS, DEFAULT_MAX_TOKENS, ModelsConfig
from shoal.models.compile_guard import run_compile_work
from shoal.models.embedded import DEFAULT_MODEL_NAME, embedded_model_path
from shoal.models.embeddings import Embedder
from shoal.models.errors import ModelError, ModelNotFoundError
from shoal.models.generate import Engine
from shoal.models.loader import build_stage, open_model, resolve_backend
from shoal.models.sampling import defaults_from_gguf
from shoal.models.served import ServedModel
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage

logger = logging.getLogger(__name__)


@dataclass
class LocalModel:
    """A model file this node holds."""

    name: str
    path: Path
    cid: str | None = None
    pinned: bool = False
    size: int = 0
    """Bytes of the model file."""
    compiled_targets: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class ServingLimits:
    """What one loaded model may take on: the `[models]` KV and queue knobs its engine enforces."""

    context: int | None = None
    """Longest prompt + completion of one request; None: the model's trained context (never more)."""
    cache_tokens: int = DEFAULT_CACHE_TOKENS
    """KV-cache tokens over all running requests (the compiled stage's pool; the engine's budget)."""
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    """`max_tokens` of a request that sets none."""
    queue_size: int = 32
    """Requests that may wait for room; one more is refused (QueueFullError)."""
    queue_timeout_s: float | None = 600.0
    """Longest wait for room (AdmissionTimeoutError past it)."""

    @classmethod
    def from_config(cls, models: ModelsConfig) -> ServingLimits:
        return cls(context=models.context, cache_tokens=models.cache_tokens,
                   default_max_tokens=models.default_max_tokens, queue_size=models.queue_size,
                   queue_timeout_s=models.queue_timeout_s)


@dataclass(frozen=True)
class LoadOptions:
    backend: str = "tvm"
    """`tvm` or `numpy`."""
    target: str | None = None
    """TVM target kind; None detects the local one."""
    cache_dir: Path | None = None
    """Compile cache; None uses models.compile's default (`$SHOAL_COMPILE_CACHE` or the user data dir)."""
    max_batch: int = 8
    """Sequences the engine decodes together."""
    limits: ServingLimits = field(default_factory=ServingLimits)


LoadFn = Callable[[LocalModel, LoadOptions, Callable[..., None]], ServedModel]


def load_engine(model: LocalModel, options: LoadOptions, progress: Callable[..., None]) -> ServedModel:
    """Blocking: open the GGUF and build one whole-model stage. The engine is started by the caller."""
    loaded = open_model(model.path)
    span = LayerSpan.whole(loaded.config.num_layers)
    backend = resolve_backend(options.backend)
    limits = options.limits
    context = min(limits.context or loaded.config.context_length, loaded.config.context_length)
    extra: dict[str, Any] = (
        {"max_batch_size": options.max_batch, "max_total_tokens": limits.cache_tokens}
        if backend == "tvm"
        else {"max_context": context}
    )
    stage = build_stage(
        loaded,
        span,
        backend=backend,
        target=options.target,
        cache_dir=options.cache_dir,
        progress=progress,
        **extra,
    )
    # Each request reserves prompt + max_tokens of the KV cache before it starts (models/admission.py).
    engine = Engine(
        [stage],
        loaded.tokenizer,
        max_batch=options.max_batch,
        max_context=context,
        kv_tokens=limits.cache_tokens,
        max_waiting=limits.queue_size,
        wait_timeout_s=limits.queue_timeout_s,
        default_max_tokens=limits.default_max_tokens,
    )
    return ServedModel(
        name=model.name,
        tokenizer=loaded.tokenizer,
        engine=engine,
        context_length=engine.max_context,
        stages=[stage],
        backend=backend,
        sampling_defaults=defaults_from_gguf(loaded.gguf.metadata),
        embedder=Embedder(model.path, context),
    )


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
    ) -> None:
        """`catalog` lists models held elsewhere on this node (the IPFS store: dicts with `names`, `cid`,
        `path`, `complete`); complete ones become servable under each of their names and their CID."""
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
        """The OpenAI model list entries (call `refresh`/`refresh_async` first to see new pulls)."""
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
                    "loaded": m.name in self._served,
                    "compiled_targets": list(m.compiled_targets),
                },
            }
            for m in self._models.values()
        ]

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

    async def acquire(self, name: str) -> ServedModel:
        """The served model `name`, loading it first if needed (ModelNotFoundError if unknown)."""
        served = self._served.get(name)
        if served is not None:
            return served
        return await self.load(name)

    async def load(self, name: str) -> ServedModel:
        model = self._canonical(self.resolve(name))
        lock = self._locks.setdefault(model.name, asyncio.Lock())
        async with lock:
            served = self._served.get(model.name)
            if served is not None:
                return served
            logger.info("loading %s from %s (backend %s)", model.name, model.path, self.backend)
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            options = LoadOptions(self.backend, self.target, self.cache_dir, self.max_batch, self.limits)
            # A compile child dies with this waiter (a client that leaves, a node that stops).
            served = await run_compile_work(self._load_fn, model, options, self._progress(model.name))
            try:
                await served.engine.start()
            except BaseException:
                await loop.run_in_executor(None, _close_stages, served)
                raise
            for stage in served.stages:
                _note_target(model, stage)
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

        def work() -> dict[str, Any]:
            loaded = open_model(model.path)
            span = (
                LayerSpan.parse(layers, loaded.config.num_layers)
                if layers
                else LayerSpan.whole(loaded.config.num_layers)
            )
            stage = build_stage(
                loaded,
                span,
                backend="tvm",
                target=target or self.target,
                cache_dir=self.cache_dir,
                progress=self._progress(model.name),
            )
            _note_target(model, stage)
            stage.close()
            return {"model": model.name, "layers": f"{span.start}:{span.stop}", "target": target or "auto"}

        started = time.perf_counter()
        result = await run_compile_work(work)
        seconds = round(time.perf_counter() - started, 3)
        self._bus.publish("compile.done", model=model.name, span=result["layers"], seconds=seconds)
        return result

    async def unload(self, name: str) -> bool:
        model = self._canonical(self.resolve(name))
        lock = self._locks.setdefault(model.name, asyncio.Lock())
        async with lock:
            served = self._served.pop(model.name, None)
            if served is None:
                return False
            await served.engine.stop()
            await asyncio.get_running_loop().run_in_executor(None, _close_stages, served)
            self._bus.publish("model.unloaded", model=model.name)
            logger.info("unloaded %s", model.name)
            return True

    async def stop(self) -> None:
        for name in list(self._served):
            try:
                await self.unload(name)
            except ModelError:
                logger.exception("unloading %s failed", name)


def _note_target(model: LocalModel, stage: Stage) -> None:
    """Record the TVM target kind (`llvm`, `cuda`) a compiled stage was built for."""
    kind = stage.target_kind
    if kind is not None and kind not in model.compiled_targets:
        model.compiled_targets.append(kind)


def _close_stages(served: ServedModel) -> None:
    for stage in served.stages:
        stage.close()
