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
