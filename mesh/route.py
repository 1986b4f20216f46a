"""`Route`: where one completion request ran — this node, one peer (offload) or a chain of stages (split).

The router (`split.router`) fills it in as the request runs; the API keeps it on the request's record and
serializes it once, at the edge (`to_dict`: the response's `shoal_route`, `GET /v1/mesh/requests`, the
`request.*` events). It sits below every package, so the API and the split package share it without importing
each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
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
    phases: Mapping[str, float] = field(default_factory=dict)
    """Where `seconds` went (`detect_s`: from the failed call's start until it failed; `close_s`, `rebuild_s`,
    `replay_s`), each in seconds."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lost": self.lost, "at_tokens": self.at_tokens,
                               "seconds": round(self.seconds, 4)}
        out.update((name, round(value, 4)) for name, value in self.phases.items())
        return out


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
    """Per-stage call accounting of a split (`stage_link.LinkTiming`, with peer, layers and link)."""
    listener: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False, compare=False)
    """Where `progress` goes: the API's stream of this request (an SSE comment), or nowhere."""

    def progress(self, message: str, **data: Any) -> None:
        """Tell the client why it waits and how far (`{"message": ..., **data}`: `waiting` says for what —
        `peer_load`, `local_load`, `peer_start`, `queue`, `recovery` — plus `seconds`, `peer`, `layers`,
        `fraction` where known). Any thread may call it: the listener is thread-safe."""
        listener = self.listener
        if listener is not None:
            listener({"message": message, **data})

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

    def measured(self, observed: ObservedTimes) -> None:
        """Record the times the request took."""
        self.observed = observed

    def timed(self, stage_timing: list[dict[str, Any]]) -> None:
        """Record a split's per-stage call accounting."""
        self.stage_timing = stage_timing

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


ROUTE_MODES = ("auto", "local", "offload", "split")
MAX_ROUTE_PEERS = 16
"""Most peer ids or names one request may list in `prefer` or `avoid`."""


@dataclass(frozen=True)
class RouteChoice:
    """What one request asks of routing (`{"shoal": {"route", "prefer", "avoid"}}` or `x-shoal-route`)."""

    mode: str = "auto"
    """`auto` (the scheduler, or the node-wide forced route), `local`, `offload` or `split`."""
    prefer: tuple[str, ...] = ()
    """Peer ids or names to use first, in this order, when the request goes to a peer."""
    avoid: tuple[str, ...] = ()
    """Peer ids or names never to use for this request."""

    def __post_init__(self) -> None:
        if self.mode not in ROUTE_MODES:
            raise ValueError(f"route must be one of {', '.join(ROUTE_MODES)}")
        for name in ("prefer", "avoid"):
            peers = getattr(self, name)
            ok = all(isinstance(p, str) and 0 < len(p) <= 128 for p in peers)
            if len(peers) > MAX_ROUTE_PEERS or not ok:
                raise ValueError(f"{name} must list at most {MAX_ROUTE_PEERS} peer ids or names")

    @property
    def is_default(self) -> bool:
        return self.mode == "auto" and not self.prefer and not self.avoid


class RouteFailed(Exception):
    """A request could not be routed (no usable device, or its peer refused, failed or is over quota): the
    API answers `status` with an OpenAI-style body carrying `code` (`peer_refused`, `peer_unreachable`,
    `peer_busy`, `peer_quota`, `no_route`)."""

    def __init__(self, status: int, code: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
