"""Text embeddings: the mean over positions of the model's last (final-normed) hidden state, L2-normalised.

The compiled stages return logits only, so `Embedder` runs the NumPy reference forward of the whole model
(`ReferenceStage.hidden_states`), built on first use from the GGUF file (the dequantized weights stay in
memory after that). Blocking: call it off the event loop; calls are serialised by a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from shoal.models.gguf import GGUFModel
from shoal.models.reference import ReferenceStage
from shoal.models.span import LayerSpan


def mean_pool(hidden: np.ndarray) -> np.ndarray:
    """The unit-length mean of `hidden` [n, d] over its n positions (a zero vector stays zero)."""
    pooled = np.asarray(hidden, dtype=np.float64).mean(axis=0)
    norm = float(np.linalg.norm(pooled))
    return (pooled / norm if norm > 0 else pooled).astype(np.float32)


class Embedder:
    """Embeds token-id sequences with one model."""

    def __init__(self, path: str | Path, max_context: int | None = None) -> None:
        self.path = Path(path)
        self.max_context = max_context
        self._stage: ReferenceStage | None = None
        self._lock = threading.Lock()

    @property
    def dimensions(self) -> int:
        return self._load().config.hidden_size

    def _load(self) -> ReferenceStage:
        if self._stage is None:
            model = GGUFModel.open(self.path)
            self._stage = ReferenceStage(model, LayerSpan.whole(model.config.num_layers),
                                         max_context=self.max_context)
        return self._stage

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One unit vector per token-id sequence. Raises ValueError on an empty sequence or an id outside the
        vocabulary, ContextOverflowError on one longer than the context."""
        with self._lock:
            stage = self._load()
            return [mean_pool(stage.hidden_states(np.asarray(ids, dtype=np.int32))) for ids in inputs]

    def close(self) -> None:
        with self._lock:
            if self._stage is not None:
                self._stage.close()
                self._stage = None
