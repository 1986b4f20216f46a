"""Open a model file and build stages for layer spans on a chosen backend.

    model = open_model()                                  # the embedded SmolLM2 (or open_model(path))
    stage = build_stage(model, backend="numpy")           # whole model; LayerSpan(a, b) for a shard
    engine = Engine([stage], model.tokenizer)

Backends: "tvm" compiles (or finds cached) a TVM Relax shard (`models.runtime.CompiledStage`); "numpy" is the
fp32 reference (`models.reference.ReferenceStage`); "auto" takes "tvm" when TVM imports, else "numpy".
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shoal.models.config import ModelConfig
from shoal.models.embedded import embedded_model_path
from shoal.models.gguf import GGUFModel
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage
from shoal.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Backend = Literal["tvm", "numpy", "auto"]
BACKENDS: tuple[str, ...] = ("tvm", "numpy", "auto")


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    gguf: GGUFModel
    config: ModelConfig
    tokenizer: Tokenizer


def open_model(path: str | Path | None = None) -> LoadedModel:
    """Open a GGUF (default: the embedded model): index, config and tokenizer. Weights stay on disk until a
    stage needs them. Raises ModelFileError / UnsupportedModelError with a message for the user."""
    resolved = Path(path) if path is not None else embedded_model_path()
    gguf = GGUFModel.open(resolved)
    config = gguf.config
    tokenizer = Tokenizer.from_gguf(gguf)
    gguf.release_vocabulary()  # the tokenizer has what it needs; the metadata's lists would stay resident
    return LoadedModel(path=resolved, gguf=gguf, config=config, tokenizer=tokenizer)


def tvm_available() -> bool:
    find = importlib.util.find_spec
    return find("tvm") is not None and find("shoal.models.runtime") is not None


def resolve_backend(backend: str) -> Literal["tvm", "numpy"]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if tvm_available():
            return "tvm"
        logger.warning("TVM is not available: running the NumPy reference (slow)")
        return "numpy"
    return backend  # type: ignore[return-value]


def build_stage(model: LoadedModel, span: LayerSpan | None = None, backend: str = "tvm", *,
                target: str | None = None, cache_dir: str | Path | None = None,
                progress: Callable[[float, str], None] | None = None, **options: Any) -> Stage:
    """A stage running `span` (default: every layer) of `model`. For "tvm", `target`, `cache_dir`,
    `progress(fraction, message)` and `options` go to `CompiledStage.load`; "numpy" takes `max_context`.
    Raises `InsufficientMemoryError` (with the largest context that fits) before loading a stage the
    machine's free memory cannot hold (models/memory.py)."""
    from shoal.models.memory import check_fits

    span = span or LayerSpan.whole(model.config.num_layers)
    span.check(model.config.num_layers)
    chosen = resolve_backend(backend)
    source = model.path.name
    if chosen == "numpy":
        from shoal.models.reference import ReferenceStage

        check_fits(model.gguf, span, 0, source=source)  # its KV cache grows as sequences do
        return ReferenceStage(model.gguf, span, **options)
    if not tvm_available():
        raise ValueError("the tvm backend needs apache-tvm and models.runtime; use backend='numpy'")
    from shoal.models import runtime
    from shoal.models.runtime import CompiledStage  # imports TVM: slow, heavy

    tokens = min(int(options.get("max_total_tokens", runtime.DEFAULT_MAX_TOTAL_TOKENS)),
                 model.config.context_length * int(options.get("max_batch_size", runtime.DEFAULT_MAX_BATCH)))
    check_fits(model.gguf, span, tokens, source=source,
               quantization=str(options.get("quantization", runtime.DEFAULT_QUANTIZATION)),
               prefill_chunk=int(options.get("prefill_chunk", runtime.default_prefill_chunk(target))),
               sequences=int(options.get("max_batch_size", runtime.DEFAULT_MAX_BATCH)))

    return CompiledStage.load(model.gguf, span, target=target, cache_dir=cache_dir, progress=progress,
                              **options)


def build_stages(model: LoadedModel, spans: Sequence[LayerSpan], backend: str = "tvm",
                 **kwargs: Any) -> list[Stage]:
    """Stages for spans that must tile the model's layers in order (checked)."""
    expected = 0
    for span in spans:
        if span.start != expected:
            raise ValueError(f"spans must tile the layers in order; got {span} after layer {expected}")
        expected = span.stop
    if expected != model.config.num_layers:
        raise ValueError(f"spans end at layer {expected}; the model has {model.config.num_layers}")
    stages: list[Stage] = []
    try:
        for span in spans:
            stages.append(build_stage(model, span, backend, **kwargs))
    except BaseException:
        for st in stages:
            st.close()
        raise
    return stages
