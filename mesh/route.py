"""`Route`: where one completion request ran — this node, one peer (offload) or a chain of stages (split).

The router (`split.router`) fills it in as the request runs; the API keeps it on the request's record and
serializes it once, at the edge (`to_dict`: the response's `shoal_route`, `GET /v1/mesh/requests`, the
`request.*` events). It sits below every package, so the API and the split package share it without importing
each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

RouteKind = Literal["local", "offload", "split"]
LOCAL_PEER = "local"
"""The peer name of this node's own stage in `peers`."""


@dataclass(frozen=True)
class ReplanEntry:
    """One recovery of a split: which peer was lost, after how many tokens, and how long resuming took."""

    lost: str
    at_tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"lost": self.lost, "at_tokens": self.at_tokens, "seconds": round(self.seconds, 4)}


@dataclass(frozen=True)
class ObservedTimes:
    """What the request's stream really took (seconds; None where it produced too few tokens)."""

    ttft_s: float | None
    seconds: float
    per_token_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            "seconds": round(self.seconds, 4),
            "per_token_s": None if self.per_token_s is None else round(self.per_token_s, 5),
        }


@dataclass
class Route:
    """One request's route; a fresh one is local (this node's engine, no peers)."""

    kind: RouteKind = "local"
    peers: list[str] = field(default_factory=list)
    """One entry per stage: a peer id, or `local` for this node."""
    spans: list[str] = field(default_factory=list)
    """The layer range (`a:b`) of each stage."""
    replans: int = 0
    """Times the request was re-planned after a lost peer."""
    predicted: Mapping[str, float] | None = None
    """The scheduler's prediction for the plan that runs (`scheduler.Prediction.to_dict()`)."""
    observed: ObservedTimes | None = None
    replan_log: list[ReplanEntry] = field(default_factory=list)
    stage_timing: list[dict[str, Any]] | None = None
    """Per-stage call accounting of a split (`remote_stage.LinkTiming`, with peer, layers and link)."""

    def follow(self, kind: RouteKind, stages: Iterable[tuple[str, str]], predicted: Mapping[str, float]
               ) -> None:
        """Describe the plan now running: its kind, its (peer, span) stages and its predicted times."""
        self.kind = kind
        pairs = list(stages)
        self.peers = [peer for peer, _ in pairs]
        self.spans = [span for _, span in pairs]
        self.predicted = dict(predicted)

    def replanned(self, entry: ReplanEntry | None = None) -> None:
        """Count a re-plan (and log it, for a split's recovery)."""
        self.replans += 1
        if entry is not None:
            self.replan_log.append(entry)

    def to_dict(self) -> dict[str, Any]:
        """The wire form: `kind`, `peers`, `spans`, `replans`, then whichever of `predicted`, `observed`,
        `replan_log` and `stage_timing` are known."""
        out: dict[str, Any] = {"kind": self.kind, "peers": list(self.peers), "spans": list(self.spans),
                               "replans": self.replans}
        if self.predicted is not None:
            out["predicted"] = dict(self.predicted)
        if self.observed is not None:
            out["observed"] = self.observed.to_dict()
        if self.replan_log:
            out["replan_log"] = [entry.to_dict() for entry in self.replan_log]
        if self.stage_timing is not None:
            out["stage_timing"] = [dict(t) for t in self.stage_timing]
        return out
