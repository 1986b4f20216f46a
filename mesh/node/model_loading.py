"""Loading one model file into a running `Engine`: what a loaded model may take on (`ServingLimits`), how it
is built (`LoadOptions`), and the blocking work itself (`load_engine`, `compile_span`), run by the model
manager in a compile worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.mesh.node.config import DEFAULT_CACHE_TOKENS, DEFAULT_MAX_TOKENS, ModelsConfig
from shoal.models.embeddings import Embedder
from shoal.models.generate import Engine
from shoal.models.loader import build_stage, open_model, resolve_backend
from shoal.models.sampling import defaults_from_gguf
from shoal.models.served import ServedModel
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage


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


def compile_span(model: LocalModel, target: str | None, layers: str | None, cache_dir: Path | None,
                 progress: Callable[..., None]) -> dict[str, Any]:
    """Blocking: build (or find cached) the library for `layers` (default: all) of `model`, not served."""
    loaded = open_model(model.path)
    layer_count = loaded.config.num_layers
    span = LayerSpan.parse(layers, layer_count) if layers else LayerSpan.whole(layer_count)
    stage = build_stage(loaded, span, backend="tvm", target=target, cache_dir=cache_dir, progress=progress)
    note_target(model, stage)
    stage.close()
    return {"model": model.name, "layers": f"{span.start}:{span.stop}", "target": target or "auto"}


def note_target(model: LocalModel, stage: Stage) -> None:
    """Record the TVM target kind (`llvm`, `cuda`) a compiled stage was built for."""
    kind = stage.target_kind
    if kind is not None and kind not in model.compiled_targets:
        model.compiled_targets.append(kind)


def close_stages(served: ServedModel) -> None:
    for stage in served.stages:
        stage.close()
