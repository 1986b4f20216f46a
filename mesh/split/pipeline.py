"""Running one request across a chain of stages, and surviving a stage that leaves.

`SplitPipeline`: one `Stage` for the whole model made of a chain of stages (`split.remote_stage.RemoteStage`s
on peers, a `split.hosted.DirectStage` for this node's own part). It remembers every token id fed to each
sequence; when a stage is lost it asks its `rebuild` callback for a new chain (a re-plan without the lost
peer), re-runs prefill over the remembered ids on the new chain, then retries the call that failed. The
engine above sees one slow step — no token is lost or repeated, and its sampler state is untouched, so
greedy output equals the run without the fault.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from shoal.mesh.p2p.errors import MeshError
from shoal.mesh.split.remote_stage import LinkTiming, StageLost
from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage, StageDefaults

logger = logging.getLogger(__name__)



def _token_ids(inputs: np.ndarray) -> list[int]:
    """Token ids as Python ints (one `tolist`, not a NumPy scalar per id)."""
    return np.asarray(inputs, dtype=np.int64).reshape(-1).tolist()


class ChainStage(Stage, Protocol):
    """A link of the chain: a peer's part (`split.remote_stage.RemoteStage`) or this node's own
    (`split.hosted.DirectStage`)."""

    peer: str
    """The peer that runs it (`local`: this node)."""
    timing: LinkTiming

    @property
    def transport(self) -> str:
        """How calls travel: "local", "direct" (a tensor link) or "channel" (a data channel)."""
        ...

    def decode_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int]:
        """`decode` + each row's argmax (the lowest id among ties), taken where the logits are."""
        ...

    def abandon(self) -> None:
        """Drop the stage without waiting on its peer, which is gone."""
        ...


Rebuild = Callable[[frozenset[str]], list[ChainStage]]
"""Blocking: a new chain of stages tiling the model, avoiding the given peers (a re-plan)."""


@dataclass
class Replan:
    lost: str
    reason: str
    at_tokens: int
    seconds: float
    stages: list[tuple[str, str]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    """`detect_s` (the failed call, from its start until it failed), `close_s` (dropping the old chain),
    `rebuild_s` (re-plan and open the new stages), `replay_s` (prefill of the remembered ids)."""


class SplitPipeline(StageDefaults):
    """A whole-model `Stage` run by a chain of stages, rebuilt (at most `max_replans` times) on a loss."""

    def __init__(self, config: ModelConfig, stages: list[ChainStage], rebuild: Rebuild, *,
                 max_replans: int = 3, on_replan: Callable[[Replan], None] | None = None,
                 progress: Callable[..., None] | None = None) -> None:
        """`progress` (`mesh.route.Route.progress`): told of a lost stage and of the resumed request."""
        self._check_chain(config, stages)
        self.config = config
        self.span = LayerSpan.whole(config.num_layers)
        self.stages = stages
        self._rebuild = rebuild
        self._max_replans = max_replans
        self._on_replan = on_replan
        self._progress = progress
        self._history: dict[int, list[int]] = {}
        self._excluded: set[str] = set()
        self.replans: list[Replan] = []
        self._attempts = 0
        self._closed = False

    @staticmethod
    def _check_chain(config: ModelConfig, stages: list[ChainStage]) -> None:
        start = 0
        for stage in stages:
            if stage.span.start != start:
                raise ValueError(f"stages do not tile the model: {[str(s.span) for s in stages]}")
            start = stage.span.stop
        if start != config.num_layers:
            raise ValueError(f"stages end at layer {start}, the model has {config.num_layers}")

    def route(self) -> list[tuple[str, str]]:
        return [(s.peer, str(s.span)) for s in self.stages]

    def timings(self) -> list[dict[str, Any]]:
        """Per-stage call accounting of the current chain (see `LinkTiming`)."""
        return [{"peer": stage.peer, "layers": str(stage.span), "link": stage.transport,
                 **stage.timing.to_dict()} for stage in self.stages]

    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._history:
            raise ValueError(f"sequence {seq_id} exists already")
        self._retrying(lambda: [s.add_sequence(seq_id) for s in self.stages])
        self._history[seq_id] = []

    def remove_sequence(self, seq_id: int) -> None:
        if self._history.pop(seq_id, None) is None:
            return
        for stage in self.stages:
            try:
                stage.remove_sequence(seq_id)
            except StageLost as exc:
                logger.info("removing sequence %d: %s", seq_id, exc)

    def sequence_length(self, seq_id: int) -> int:
        try:
            return len(self._history[seq_id])
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id}") from None

    def _chain(self, op: str, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        x = inputs
        for stage in self.stages:
            x = stage.prefill(seq_ids[0], x) if op == "prefill" else stage.decode(seq_ids, x)
        return x

    def _chain_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int]:
        *body, last = self.stages
        x = inputs
        for stage in body:
            x = stage.decode(seq_ids, x)
        return last.decode_argmax(seq_ids, x)

    def prefill(self, seq_id: int, inputs: np.ndarray) -> np.ndarray:
        ids = _token_ids(inputs)
        if seq_id not in self._history:
            raise ValueError(f"unknown sequence {seq_id}; call add_sequence first")
        out = self._retrying(lambda: self._chain("prefill", [seq_id], inputs))
        self._history[seq_id].extend(ids)
        return out

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        return self._decode(seq_ids, inputs, lambda: self._chain("decode", list(seq_ids), inputs))

    def decode_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int]:
        """`decode` + each row's argmax, taken by the last stage (a remote one sends back only the ids)."""
        return self._decode(seq_ids, inputs, lambda: self._chain_argmax(list(seq_ids), inputs))

    def _decode(self, seq_ids: list[int], inputs: np.ndarray, step: Callable[[], Any]) -> Any:
        ids = _token_ids(inputs)
        missing = [s for s in seq_ids if s not in self._history]
        if missing or len(ids) != len(seq_ids):
            raise ValueError(f"decode needs one id per known sequence (unknown: {missing})")
        out = self._retrying(step)
        for s, t in zip(seq_ids, ids, strict=True):
            self._history[s].append(t)
        return out

    def _retrying(self, call: Callable[[], Any]) -> Any:
        while True:
            began = time.perf_counter()
            try:
                return call()
            except StageLost as exc:
                lost = exc
            detect = time.perf_counter() - began
            while True:  # recover; a stage of the new chain may be lost during the replay too
                self._attempts += 1
                if self._attempts > self._max_replans:
                    raise lost
                try:
                    self._recover(lost, detect)
                    break
                except StageLost as exc:
                    lost = exc
                    detect = 0.0

    def _recover(self, lost: StageLost, detect_s: float = 0.0) -> None:
        started = time.perf_counter()
        logger.warning("split: %s; re-planning without it", lost)
        if self._progress is not None:
            self._progress(f"peer {lost.peer[:12]} was lost; re-planning without it", waiting="recovery",
                           peer=lost.peer, seconds=round(detect_s, 3))
        self._excluded.add(lost.peer)  # "local" too: this node failed to build its part
        old, self.stages = self.stages, []
        for stage in old:
            try:
                if stage.peer == lost.peer:
                    stage.abandon()  # its peer is gone: don't wait on it to say goodbye
                else:
                    stage.close()
            except (StageLost, ValueError, MeshError) as exc:
                logger.info("closing %r after a loss: %s", stage, exc)
        closed = time.perf_counter()
        stages = self._rebuild(frozenset(self._excluded))
        self._check_chain(self.config, stages)
        self.stages = stages
        built = time.perf_counter()
        for seq_id, history in self._history.items():
            for stage in stages:
                stage.add_sequence(seq_id)
            if history:
                self._chain("prefill", [seq_id], np.asarray(history, dtype=np.int32))
        tokens = max((len(h) for h in self._history.values()), default=0)
        ended = time.perf_counter()
        phases = {"detect_s": detect_s, "close_s": closed - started, "rebuild_s": built - closed,
                  "replay_s": ended - built}
        replan = Replan(lost.peer, str(lost), tokens, ended - started, self.route(), phases)
        self.replans.append(replan)
        logger.warning("split: resumed on %s after %.2f s (replayed %d tokens; %s)", replan.stages,
                       replan.seconds, tokens, ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
        if self._on_replan is not None:
            self._on_replan(replan)
        if self._progress is not None:
            where = ", ".join(f"{peer[:12]} {span}" for peer, span in replan.stages)
            self._progress(f"resumed on {where} after {replan.seconds:.2f} s (replayed {tokens} tokens)",
                           waiting="recovery", seconds=round(replan.seconds, 3), replayed=tokens)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._history.clear()
        for stage in self.stages:
            try:
                stage.close()
            except (StageLost, ValueError, MeshError) as exc:
                logger.info("closing %r: %s", stage, exc)
