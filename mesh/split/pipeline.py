"""Running one request across a chain of stages, and surviving a stage that leaves.

`SplitPipeline`: one `Stage` for the whole model made of a chain of stages (`split.remote_stage.RemoteStage`s
on peers, a `split.hosted.DirectStage` for this node's own part). It remembers every token id fed to each
sequence; when a stage is lost it asks its `rebuild` callback for a new chain (a re-plan without the lost
peer), re-runs prefill over the remembered ids on the new chain, then retries the call that failed. The
engine above sees one slow step — no token is lost or repeated, and its sampler state is untouched, so
greedy output equals the run without the fault.

With `chain`, a decode step passes from one remote stage straight to the next (b → c → this node) where the
peers link to each other, instead of coming back here between them (docs/split.md, *A chain instead of the
star*); prefill calls and everything else go stage by stage from here.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from shoal.mesh.p2p.errors import MeshError
from shoal.mesh.split.remote_stage import RemoteStage, StageLost
from shoal.mesh.split.stage_link import LinkTiming
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
Replace = Callable[[LayerSpan, frozenset[str]], "ChainStage | None"]
"""Blocking: one stage for the span of a lost stage, avoiding the given peers (None: re-plan the chain)."""
MAX_KEPT_BYTES = 64 << 20
"""Inputs of the stages kept per request (for a patch, below); past this the request re-plans whole."""
Spec = tuple[str, list[int], bool]
"""A call: op (`prefill`/`decode`, or `open`: adding a sequence), its sequences, whether the last stage
takes the argmax."""


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
                 progress: Callable[..., None] | None = None, replace: Replace | None = None,
                 chain: bool = False) -> None:
        """`progress` (`mesh.route.Route.progress`): told of a lost stage and of the resumed request.
        `replace`: with it, a lost stage of a one-sequence request is *patched*: only its span gets a new
        stage, prefilled with the inputs that stage had (kept as the request runs, up to `MAX_KEPT_BYTES`);
        the other stages keep their KV caches, and the failed step goes on from the new stage.
        `chain`: decode steps pass from one remote stage straight to the next where their peers link to each
        other (`link_chain`), instead of each coming back here."""
        self._check_chain(config, stages)
        self._linking = chain
        if chain:
            link_chain(stages)
        self.config = config
        self.span = LayerSpan.whole(config.num_layers)
        self.stages = stages
        self._rebuild = rebuild
        self._max_replans = max_replans
        self._on_replan = on_replan
        self._progress = progress
        self._history: dict[int, list[int]] = {}
        self._replace = replace
        self._keeping = replace is not None
        self._kept: dict[int, dict[int, list[np.ndarray]]] = {}
        """Per sequence, per stage index > 0: that stage's inputs so far (the previous stage's outputs)."""
        self._kept_bytes = 0
        self._at: tuple[int, np.ndarray] | None = None
        """The stage index and input of the call in flight (where a patch resumes)."""
        self._through = False
        """The call in flight goes through a chain: the stages after it may have run the step already."""
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

    @property
    def waits_on_peers(self) -> bool:
        """A step blocks on a peer (any stage is remote): the engine delivers the last step's tokens while it
        does (models/idle.py)."""
        return any(stage.waits_on_peers for stage in self.stages)

    def timings(self) -> list[dict[str, Any]]:
        """Per-stage call accounting of the current chain (see `LinkTiming`)."""
        return [{"peer": stage.peer, "layers": str(stage.span), "link": stage.transport,
                 **stage.timing.to_dict()} for stage in self.stages]

    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._history:
            raise ValueError(f"sequence {seq_id} exists already")
        self._retrying(lambda: self._open(self.stages, seq_id), ("open", [seq_id], False))
        self._history[seq_id] = []

    def remove_sequence(self, seq_id: int) -> None:
        self._kept.pop(seq_id, None)
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

    @staticmethod
    def _open(stages: list[ChainStage], seq_id: int) -> None:
        """Add the sequence to every stage, the last first: a stage passing its steps on names the next
        stage's sequence when it opens."""
        for stage in reversed(stages):
            stage.add_sequence(seq_id)

    def _chain(self, op: str, seq_ids: list[int], inputs: np.ndarray, argmax: bool = False, start: int = 0
               ) -> Any:
        """Run stages `start`.. on `inputs`; with `argmax` the last stage returns each row's argmax."""
        x = inputs
        last = len(self.stages) - 1
        k = start
        while k <= last:
            stage = self.stages[k]
            self._at = (k, x)
            after = self._passed_to(k, seq_ids) if op == "decode" else []
            if after:
                self._through = True
                k += len(after)
                assert isinstance(stage, RemoteStage)
                x = stage.decode_through(after, seq_ids, x, argmax and k == last)
                if k == last:
                    return x
            elif argmax and k == last:
                return stage.decode_argmax(seq_ids, x)
            else:
                x = stage.prefill(seq_ids[0], x) if op == "prefill" else stage.decode(seq_ids, x)
            if self._keeping and k < last:
                self._keep(k + 1, seq_ids, x)
            k += 1
        return x

    def _passed_to(self, k: int, seq_ids: list[int]) -> list[RemoteStage]:
        """The stages after stage `k` that a decode step of `seq_ids` passes through on its own (a chain)."""
        after: list[RemoteStage] = []
        current = self.stages[k]
        for following in self.stages[k + 1:]:
            if not isinstance(current, RemoteStage) or not current.passes_to(following, seq_ids):
                break
            assert isinstance(following, RemoteStage)
            after.append(following)
            current = following
        return after

    def _keep(self, index: int, seq_ids: list[int], x: np.ndarray) -> None:
        if len(seq_ids) != 1 or self._kept_bytes + x.nbytes > MAX_KEPT_BYTES:
            self._keeping = False  # batched, or too long a history: a loss re-plans the whole chain
            self._kept.clear()
            return
        self._kept.setdefault(seq_ids[0], {}).setdefault(index, []).append(np.array(x, copy=True))
        self._kept_bytes += x.nbytes

    def prefill(self, seq_id: int, inputs: np.ndarray) -> np.ndarray:
        ids = _token_ids(inputs)
        if seq_id not in self._history:
            raise ValueError(f"unknown sequence {seq_id}; call add_sequence first")
        spec: Spec = ("prefill", [seq_id], False)
        out = self._retrying(lambda: self._chain("prefill", [seq_id], inputs), spec)
        self._history[seq_id].extend(ids)
        return out

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        return self._decode(seq_ids, inputs, False)

    def decode_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int]:
        """`decode` + each row's argmax, taken by the last stage (a remote one sends back only the ids)."""
        return self._decode(seq_ids, inputs, True)

    def _decode(self, seq_ids: list[int], inputs: np.ndarray, argmax: bool) -> Any:
        ids = _token_ids(inputs)
        missing = [s for s in seq_ids if s not in self._history]
        if missing or len(ids) != len(seq_ids):
            raise ValueError(f"decode needs one id per known sequence (unknown: {missing})")
        seqs = list(seq_ids)
        out = self._retrying(lambda: self._chain("decode", seqs, inputs, argmax), ("decode", seqs, argmax))
        for s, t in zip(seq_ids, ids, strict=True):
            self._history[s].append(t)
        return out

    def _retrying(self, call: Callable[[], Any], spec: Spec) -> Any:
        while True:
            began = time.perf_counter()
            self._at = None
            self._through = False
            try:
                return call()
            except StageLost as exc:
                lost = exc
            detect = time.perf_counter() - began
            if self._patchable(lost, spec):
                self._attempts += 1
                if self._attempts > self._max_replans:
                    raise lost
                try:
                    return self._patch(lost, detect, spec)
                except StageLost as exc:  # the replacement failed too: re-plan the whole chain
                    lost = exc
                    detect = 0.0
            swap = self._through  # a chain's step: first try this node's stage in the lost one's place
            while True:  # recover; a stage of the new chain may be lost during the replay too
                self._attempts += 1
                if self._attempts > self._max_replans:
                    raise lost
                try:
                    self._recover(lost, detect, swap)
                    break
                except StageLost as exc:
                    lost = exc
                    detect = 0.0
                    swap = False

    def _patchable(self, lost: StageLost, spec: Spec) -> bool:
        if self._replace is None or not self._keeping or self._at is None or spec[0] == "open":
            return False
        if self._through:  # the stages after the lost one may have run the step: re-plan them all
            return False
        _, seq_ids, _ = spec
        if len(seq_ids) != 1 or len(self._history) != 1:
            return False
        peers = [stage.peer for stage in self.stages]
        return peers[self._at[0]] == lost.peer and peers.count(lost.peer) == 1

    def _patch(self, lost: StageLost, detect_s: float, spec: Spec) -> Any:
        """Replace only the lost stage: prefill a new stage for its span with that stage's past inputs, then
        run the failed call on from it. The other stages keep their KV caches."""
        assert self._at is not None
        index, current = self._at
        op, seq_ids, argmax = spec
        seq = seq_ids[0]
        started = time.perf_counter()
        self._announce(lost, detect_s)
        old = self.stages[index]
        old.abandon()
        self._excluded.add(lost.peer)
        new = self._replace(old.span, frozenset(self._excluded))
        if new is None:
            raise lost
        built = time.perf_counter()
        rows = int(np.asarray(current).shape[0])
        history = self._history[seq]
        if index == 0:
            past = np.asarray(history, dtype=np.int32)
        else:
            kept = self._kept.get(seq, {}).get(index, [])
            past = np.concatenate(kept)[:-rows] if kept else np.zeros((0, 0), np.float32)
            if past.shape[0] != len(history):  # not what this stage saw: re-plan the whole chain
                new.close()
                raise lost
        try:
            new.add_sequence(seq)
            if len(past):
                new.prefill(seq, past)
        except BaseException:
            new.close()
            raise
        self.stages[index] = new
        ended = time.perf_counter()
        phases = {"detect_s": detect_s, "close_s": 0.0, "rebuild_s": built - started,
                  "replay_s": ended - built}
        self._resumed(Replan(lost.peer, str(lost), len(history), ended - started, self.route(), phases),
                      len(past), f"layers {old.span} only")
        return self._chain(op, seq_ids, current, argmax, start=index)

    def _announce(self, lost: StageLost, detect_s: float) -> None:
        logger.warning("split: %s; re-planning without it", lost)
        if self._progress is not None:
            self._progress(f"peer {lost.peer[:12]} was lost; re-planning without it", waiting="recovery",
                           peer=lost.peer, seconds=round(detect_s, 3))

    def _resumed(self, replan: Replan, replayed: int, what: str = "") -> None:
        self.replans.append(replan)
        logger.warning("split: resumed on %s after %.2f s (replayed %d tokens%s; %s)", replan.stages,
                       replan.seconds, replayed, f" through {what}" if what else "",
                       ", ".join(f"{k} {v:.3f}" for k, v in replan.phases.items()))
        if self._on_replan is not None:
            self._on_replan(replan)
        if self._progress is not None:
            where = ", ".join(f"{peer[:12]} {span}" for peer, span in replan.stages)
            self._progress(f"resumed on {where} after {replan.seconds:.2f} s (replayed {replayed} tokens)",
                           waiting="recovery", seconds=round(replan.seconds, 3), replayed=replayed)

    def _recover(self, lost: StageLost, detect_s: float = 0.0, swap: bool = False) -> None:
        """Re-plan the chain without the lost peer and replay every sequence through it. With `swap` (a
        chain's step was lost: whether the stages after the lost one ran it is unknown, so a patch cannot
        tell what they hold) first try the same chain with this node's own stage in the lost one's place —
        no re-plan, no span to load on a peer: the other stages keep their loaded spans, only their
        sequences start over."""
        started = time.perf_counter()
        self._announce(lost, detect_s)
        self._excluded.add(lost.peer)  # "local" too: this node failed to build its part
        old, self.stages = self.stages, []
        swapped = self._swapped(old, lost) if swap else None
        for stage in old:
            try:
                if stage.peer == lost.peer:
                    stage.abandon()  # its peer is gone: don't wait on it to say goodbye
                elif swapped is not None:
                    for seq_id in self._history:
                        stage.remove_sequence(seq_id)
                    if isinstance(stage, RemoteStage):
                        stage.relink()
                else:
                    stage.close()
            except (StageLost, ValueError, MeshError) as exc:
                logger.info("closing %r after a loss: %s", stage, exc)
        closed = time.perf_counter()
        stages = swapped if swapped is not None else self._rebuild(frozenset(self._excluded))
        self._check_chain(self.config, stages)
        if self._linking:
            link_chain(stages)
        self.stages = stages
        built = time.perf_counter()
        self._kept.clear()  # the new chain's stages: kept again as the replay runs
        self._kept_bytes = 0
        for seq_id, history in self._history.items():
            self._open(stages, seq_id)
            if history:
                self._chain("prefill", [seq_id], np.asarray(history, dtype=np.int32))
        tokens = max((len(h) for h in self._history.values()), default=0)
        ended = time.perf_counter()
        phases = {"detect_s": detect_s, "close_s": closed - started, "rebuild_s": built - closed,
                  "replay_s": ended - built}
        self._resumed(Replan(lost.peer, str(lost), tokens, ended - started, self.route(), phases), tokens)

    def _swapped(self, stages: list[ChainStage], lost: StageLost) -> list[ChainStage] | None:
        """`stages` with this node's own stage for the lost one's span (`replace`), or None when it cannot
        be had (then the chain is re-planned)."""
        peers = [stage.peer for stage in stages]
        if self._replace is None or peers.count(lost.peer) != 1:
            return None
        index = peers.index(lost.peer)
        new = self._replace(stages[index].span, frozenset(self._excluded))
        if new is None:
            return None
        return [new if k == index else stage for k, stage in enumerate(stages)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._history.clear()
        self._kept.clear()
        for stage in self.stages:
            try:
                stage.close()
            except (StageLost, ValueError, MeshError) as exc:
                logger.info("closing %r: %s", stage, exc)


def link_chain(stages: list[ChainStage]) -> None:
    """Make each pair of consecutive remote stages on different peers a link of a chain: the first passes its
    decode steps to the second, which the first's peer may then feed (each stage's `stage.open` says so; a
    peer that cannot link to the next leaves that step to the origin)."""
    for stage in stages:  # a chain rebuilt after a loss: links to stages no longer in it go
        if isinstance(stage, RemoteStage):
            stage.next_stage, stage.feeder = None, None
    for before, after in itertools.pairwise(stages):
        if isinstance(before, RemoteStage) and isinstance(after, RemoteStage) and before.peer != after.peer:
            before.next_stage, after.feeder = after, before.peer
