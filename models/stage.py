"""The seam between generation and whatever runs a layer range: a `Stage`.

A model is served by a chain of stages whose spans tile [0, num_layers). A stage may be the NumPy reference
(`models.reference.ReferenceStage`), a compiled TVM shard (`models.runtime.CompiledStage`) or a peer over the
mesh (`mesh.split.remote_stage.RemoteStage`). Every method here is blocking: async callers run them in an
executor.

Data contract (all arrays C-contiguous, little-endian):
- Input of the first stage: int32 token ids. Input of any other stage: float32 hidden states [n, hidden].
- Output of a non-last stage: float32 hidden states [n, hidden] (prefill: every position; decode: one row
  per sequence).
- Output of the last stage: float32 logits. Prefill returns the logits of the last position only, [vocab];
  decode returns [batch, vocab].
- Sequences are identified by caller-chosen non-negative ints; each stage keeps the KV cache of its layers
  for each live sequence.

Optional members, declared with the values that mean "not offered" on `StageDefaults` (which stages
inherit, overriding what they offer):
- `decode_argmax(seq_ids, inputs) -> list[int] | None`: a last stage whose logits live elsewhere (a split's
  remote last stage) returns `decode` followed by each row's argmax (the lowest id among ties), without
  moving the rows; None (the default) means "not offered: call `decode`". The engine asks it for a step whose
  requests all decode greedily without penalties.
- `max_total_tokens` (tokens over all sequences) and `kv_page_size` (the unit each sequence holds): a stage
  with a fixed KV pool says so, and the engine's admission (models/admission.py) never lets requests reserve
  more. `max_context`: the longest sequence the stage holds (None: the model's context length).
- `target_kind`: the TVM target kind (`llvm`, `cuda`) a compiled stage runs on; None for others.
- `waits_on_peers`: a decode call blocks on another device (a split with remote stages); such a stage calls
  `models.idle.waiting()` just before it blocks, and the engine defers its delivery of the last step's tokens
  to then (models/idle.py). False (the default): the engine delivers at once.
 A stage whose failed call leaves a sequence's cache changed must make `sequence_length` tell (or
raise): the engine re-runs a failed batched decode alone only for sequences still at their pre-step length.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan


@runtime_checkable
class Stage(Protocol):
    config: ModelConfig
    span: LayerSpan
    max_context: int | None
    max_total_tokens: int | None
    kv_page_size: int
    target_kind: str | None
    waits_on_peers: bool

    def decode_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int] | None:
        """`decode` + each row's argmax, taken where the logits are; None when the stage does not offer it."""

    def add_sequence(self, seq_id: int) -> None:
        """Start an empty KV cache for `seq_id`. Raises ValueError if it exists already."""

    def remove_sequence(self, seq_id: int) -> None:
        """Free `seq_id`'s KV cache. Unknown ids are ignored (remove is idempotent)."""

    def sequence_length(self, seq_id: int) -> int:
        """Tokens held in `seq_id`'s KV cache."""

    def prefill(self, seq_id: int, inputs: np.ndarray) -> np.ndarray:
        """Append `inputs` ([n] ids or [n, hidden]) to `seq_id`; see the module docstring for the output."""

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        """One step for each of `seq_ids` (inputs [b] ids or [b, hidden]); rows follow `seq_ids`' order."""

    def close(self) -> None:
        """Release memory. Safe to call twice."""


class StageDefaults:
    """A `Stage`'s optional members, as "not offered"; stages inherit this and override what they offer."""

    max_context: int | None = None
    max_total_tokens: int | None = None
    kv_page_size: int = 1
    target_kind: str | None = None
    waits_on_peers: bool = False

    def decode_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int] | None:
        return None


def ids_in_range(ids: np.ndarray, high: int) -> bool:
    """0 <= every id < high. A decode step's few ids are checked in Python: numpy's reductions cost more than
    they save below a few hundred values (~25 µs with cold caches, against ~5)."""
    if ids.size <= 512:
        flat = ids.ravel().tolist()
        return not flat or (min(flat) >= 0 and max(flat) < high)
    return bool(ids.min() >= 0 and ids.max() < high)
