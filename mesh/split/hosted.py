"""A stage this node hosts (`HostedStage`), and `DirectStage`: the local part of this node's own split, which
calls a hosted stage on the caller's thread. `HostError` is how the host refuses a control request;
`check_inputs` how it checks a tensor frame's inputs against the stage."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from shoal.mesh.p2p.errors import RemoteError
from shoal.mesh.split import wire
from shoal.mesh.split.stage_link import LinkTiming
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage, StageDefaults, ids_in_range


class HostError(RemoteError):
    """A `stage.open`/`stage.close` the host refuses; `code` is one of `split.wire`'s error codes. Being a
    `RemoteError`, the peer link turns it into an error reply with that code."""


@dataclass
class HostedStage:
    """One stage this node hosts (per (model, span)), shared by remote sequences and local `DirectStage`s."""

    key: tuple[str, LayerSpan]
    stage: Stage
    cid: str | None = None
    """The model's CID where the opener gave one (a later open by another name with the same CID reuses
    this stage)."""
    nbytes: int = 0
    """What the stage holds, as the planner counts it (`SplitService.stage_bytes`): it is listed in the
    advert's `shards` and counted against the memory this node offers while in use."""
    sequences: set[int] = field(default_factory=set)
    users: int = 0
    """Local `DirectStage`s holding this stage (it is not trimmed while any exist)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Serialises calls into `stage` (the host's worker and local callers' threads)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.lock:
            return fn(*args)

    @property
    def idle(self) -> bool:
        """No remote sequence and no local `DirectStage` uses it (the host may close it)."""
        return not self.sequences and not self.users


class DirectStage(StageDefaults):
    """The local part of a split: a stage this node hosts, called directly on the caller's (the engine's)
    thread, without hopping through the event loop and the host's worker. Shares the hosted stage (and its
    lock) with remote peers' sequences; keeps it from being trimmed until closed."""

    peer = "local"
    transport = "local"

    def __init__(self, hosted: HostedStage, new_id: Callable[[], int]) -> None:
        self._new_id = new_id
        self._hosted = hosted
        self.config = hosted.stage.config
        self.span = hosted.stage.span
        self._ids: dict[int, int] = {}
        self._closed = False
        self.timing = LinkTiming()
        hosted.users += 1

    def _local(self, seq_id: int) -> int:
        try:
            return self._ids[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id}; call add_sequence first") from None

    def add_sequence(self, seq_id: int) -> None:
        if self._closed:
            raise ValueError("stage is closed")
        if seq_id in self._ids:
            raise ValueError(f"sequence {seq_id} exists already")
        local = self._new_id()
        self._hosted.call(self._hosted.stage.add_sequence, local)
        self._hosted.sequences.add(local)
        self._ids[seq_id] = local

    def remove_sequence(self, seq_id: int) -> None:
        local = self._ids.pop(seq_id, None)
        if local is None:
            return
        self._hosted.sequences.discard(local)
        self._hosted.call(self._hosted.stage.remove_sequence, local)

    def sequence_length(self, seq_id: int) -> int:
        return self._hosted.call(self._hosted.stage.sequence_length, self._local(seq_id))

    def _timed(self, fn: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
        started = time.perf_counter()
        out = self._hosted.call(fn, *args)
        elapsed = time.perf_counter() - started
        self.timing.calls += 1
        self.timing.seconds += elapsed
        self.timing.compute_s += elapsed
        return out

    def prefill(self, seq_id: int, inputs: np.ndarray) -> np.ndarray:
        return self._timed(self._hosted.stage.prefill, self._local(seq_id), inputs)

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        return self._timed(self._hosted.stage.decode, [self._local(s) for s in seq_ids], inputs)

    def decode_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int]:
        """`decode` + each row's argmax (the lowest id among ties)."""
        return [int(i) for i in np.argmax(self.decode(seq_ids, inputs), axis=1)]

    def close(self) -> None:
        if self._closed:
            return
        for seq_id in list(self._ids):
            self.remove_sequence(seq_id)
        self._closed = True
        self._hosted.users -= 1

    def abandon(self) -> None:
        """Close it (this node's own part: there is no peer to wait on)."""
        self.close()

    def __repr__(self) -> str:
        return f"DirectStage(layers {self.span})"


def check_inputs(stage: Stage, message: wire.TensorMessage) -> np.ndarray:
    """The frame's inputs as the stage takes them (token ids for the first stage, float32 hidden states for
    the others); `wire.FrameError` when they do not fit it."""
    array = message.array
    if array is None:
        raise wire.FrameError(wire.BAD_TENSOR, "the frame carries no tensor")
    config = stage.config
    if stage.span.is_first():
        if array.dtype.kind != "i" or array.ndim != 1:
            raise wire.FrameError(wire.BAD_TENSOR, "the first stage takes int32 token ids [n]")
        if not ids_in_range(array, config.vocab_size):
            raise wire.FrameError(wire.BAD_TENSOR, f"token ids must be in [0, {config.vocab_size})")
        return array
    if array.dtype.kind != "f" or array.ndim != 2 or array.shape[1] != config.hidden_size:
        raise wire.FrameError(wire.BAD_TENSOR,
                              f"this stage takes float hidden states [n, {config.hidden_size}]")
    # a float64 sum of float16/32 values cannot overflow: it is finite iff every value is (one pass, where
    # isfinite().all() takes two)
    if not math.isfinite(array.sum(dtype=np.float64)):
        raise wire.FrameError(wire.BAD_TENSOR, "hidden states must be finite")
    return array.astype(np.float32, copy=False)
