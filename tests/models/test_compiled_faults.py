"""A CompiledStage whose forward fails past TVM's `begin_forward` marks that call's sequences unusable (TVM
grew them already and cannot roll them back), so the engine ends those requests instead of re-running them
on a shifted cache; other sequences, and new ones, keep working."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from shoal.models.runtime import CompiledStage
from shoal.models.span import LayerSpan

from tests.models.shared_model import fresh_seq_id, gguf_model


@pytest.fixture(scope="module")
def stage() -> Iterator[CompiledStage]:
    stage = CompiledStage.load(gguf_model(), LayerSpan(0, 30), target="llvm")
    yield stage
    stage.close()


def test_a_failed_forward_breaks_only_its_sequences(stage: CompiledStage) -> None:
    a, b, c = fresh_seq_id(), fresh_seq_id(), fresh_seq_id()
    for seq in (a, b, c):
        stage.add_sequence(seq)
        stage.prefill(seq, np.arange(100, 110, dtype=np.int32))
    want = np.array(stage.decode([c], np.asarray([5], dtype=np.int32)))
    batch_decode = stage._batch_decode

    def failing(*args: object) -> object:
        raise RuntimeError("injected kernel fault")

    stage._batch_decode = failing  # the VM call past begin_forward fails
    try:
        with pytest.raises(RuntimeError, match="injected kernel fault"):
            stage.decode([a, b], np.asarray([5, 6], dtype=np.int32))
    finally:
        stage._batch_decode = batch_decode
    for seq in (a, b):
        with pytest.raises(ValueError, match=f"sequence {seq}'s KV cache is unusable"):
            stage.sequence_length(seq)
        with pytest.raises(ValueError, match="unusable after a failed step"):
            stage.decode([seq], np.asarray([5], dtype=np.int32))
    assert stage.sequence_length(c) == 11  # untouched by the failed call
    stage.remove_sequence(a)
    stage.add_sequence(a)  # a removed sequence id is usable again
    stage.prefill(a, np.arange(100, 110, dtype=np.int32))
    got = stage.decode([a], np.asarray([5], dtype=np.int32))
    np.testing.assert_allclose(got, want, atol=1e-4)  # same history as c's: same logits
    for seq in (a, b, c):
        stage.remove_sequence(seq)
