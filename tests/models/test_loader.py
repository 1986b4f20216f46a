"""models.loader: opening models and building stages (the NumPy backend; TVM shards are tested with the
runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shoal.models.embedded import embedded_model_path
from shoal.models.errors import ModelFileError
from shoal.models.loader import build_stage, build_stages, open_model, resolve_backend
from shoal.models.reference import ReferenceStage
from shoal.models.span import LayerSpan


def test_open_model_defaults_to_embedded() -> None:
    model = open_model()
    assert model.path == embedded_model_path()
    assert model.config.num_layers == 30
    assert model.tokenizer.encode("Hello world") == [19556, 905]


def test_open_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        open_model(tmp_path / "nope.gguf")


def test_build_numpy_stage_for_a_span() -> None:
    model = open_model()
    stage = build_stage(model, LayerSpan(29, 30), backend="numpy", max_context=64)
    assert isinstance(stage, ReferenceStage) and stage.max_context == 64
    stage.add_sequence(3)
    logits = stage.prefill(3, np.zeros((2, 576), np.float32))
    assert logits.shape == (49152,)
    stage.close()


def test_backend_and_span_checks() -> None:
    assert resolve_backend("numpy") == "numpy"
    assert resolve_backend("auto") in ("tvm", "numpy")
    with pytest.raises(ValueError, match="unknown backend 'gpu'; choose one of tvm, numpy, auto"):
        resolve_backend("gpu")
    model = open_model()
    with pytest.raises(ValueError, match="spans must tile the layers in order; got 5:30 after layer 0"):
        build_stages(model, [LayerSpan(5, 30)], backend="numpy")
    with pytest.raises(ValueError, match="spans end at layer 10; the model has 30"):
        build_stages(model, [LayerSpan(0, 10)], backend="numpy")
    with pytest.raises(ValueError, match="exceeds the model's 30 layers"):
        build_stage(model, LayerSpan(0, 31), backend="numpy")


def test_open_model_releases_the_vocabulary_lists_once_the_tokenizer_is_built() -> None:
    """The serving path keeps the tokenizer, not the GGUF metadata's token / merge / type lists."""
    from shoal.models.gguf import VOCABULARY_KEYS
    from shoal.models.memory import describe
    from shoal.models.tokenizer import Tokenizer

    model = open_model()
    assert model.gguf.vocabulary_released
    assert not set(VOCABULARY_KEYS) & set(model.gguf.metadata)
    assert model.gguf.config.vocab_size == 49152 and model.config.vocab_size == 49152
    assert model.tokenizer.encode("Hello world") == [19556, 905]
    assert model.tokenizer.decode([19556, 905]) == "Hello world"
    assert model.gguf.metadata["tokenizer.ggml.pre"] == "smollm"  # scalars and the chat template stay
    with pytest.raises(ValueError, match="vocabulary was released"):
        Tokenizer.from_gguf(model.gguf)
    assert describe(model.path)["parameters"] > 0  # `shoal models` reads the header itself
    model.gguf.release_vocabulary()  # twice is fine
    model.gguf.close()
    model.gguf.close()


def test_releasing_the_vocabulary_frees_its_memory() -> None:
    import gc
    import tracemalloc

    from shoal.models.gguf import GGUFModel

    tracemalloc.start()
    try:
        gguf = GGUFModel.open(embedded_model_path())
        before = tracemalloc.get_traced_memory()[0]
        gguf.close()  # the file mapping and the vocabulary lists
        gc.collect()
        freed = before - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert freed > 4 << 20, f"released {freed / 2**20:.1f} MiB (49k tokens and 48.9k merges: ~6 MiB)"
    assert gguf.config.num_layers == 30 and gguf.tensor_info("token_embd.weight").shape == (49152, 576)
