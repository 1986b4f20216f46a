"""A stage this node hosts (`HostedStage`), and `DirectStage`: the local part of this node's own split, which
calls a hosted stage on the caller's thread. `HostError` is how the host refuses a control request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from shoal.mesh.p2p.errors import RemoteError
from shoal.mesh.split.remote_stage import LinkTiming
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage, StageDefaults


class HostError(RemoteError):
    """A `stage.open`/`stage.close` the host refuses; `code` is one of `split.wire`'s error codes. Being a
    `RemoteError`, the peer link turns it into an error reply with that code."""


@dataclass
class HostedStage:
    """One stage this node hosts (per (model, span)), shared by remote sequences and local `DirectStage`s."""

    key: tuple[str, LayerSpan]
    stage: Stage
    sequences: set[int] = field(default_factory=set)
    users: int = 0
    """Local `DirectStage`s holding this stage (it is not trimmed while any exist)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Serialises calls into `stage` (the host's worker and local callers' threads)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.lock:
            return fn(*args)


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
