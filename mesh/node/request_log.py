"""Recent completion requests (`GET /v1/mesh/requests`) and their `request.started/finished` events."""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shoal.mesh.events import EventBus


def local_route() -> dict[str, Any]:
    """The route of a request served entirely by this node."""
    return {"kind": "local", "peers": [], "spans": [], "replans": 0}


@dataclass
class RequestRecord:
    """One request's life: filled in by the API handler as tokens arrive."""

    id: str
    model: str
    route: dict[str, Any] = field(default_factory=local_route)
    status: str = "running"
    """running, then stop / length / cancelled / error / shutdown."""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    ttft_ms: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    _t0: float = field(default_factory=time.perf_counter, repr=False)
    _t_first: float | None = field(default=None, repr=False)
    _t_last: float | None = field(default=None, repr=False)

    def token(self) -> float | None:
        """Count one generated token; returns the gap since the previous one (None for the first)."""
        now = time.perf_counter()
        gap = None if self._t_last is None else now - self._t_last
        if self._t_first is None:
            self._t_first = now
            self.ttft_ms = (now - self._t0) * 1000.0
        self._t_last = now
        self.tokens += 1
        return gap

    @property
    def ttft_s(self) -> float | None:
        return None if self._t_first is None else self._t_first - self._t0

    @property
    def tok_s(self) -> float | None:
        if self._t_first is None or self._t_last is None or self.tokens < 2:
            return None
        span = self._t_last - self._t_first
        return (self.tokens - 1) / span if span > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "route": self.route,
            "status": self.status,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 3),
            "tokens": self.tokens,
            "tok_s": None if self.tok_s is None else round(self.tok_s, 3),
            "started": self.started,
            "finished": self.finished,
        }


class RequestLog:
    """A ring buffer of the newest requests; publishes an event when one starts and when it finishes."""

    def __init__(self, bus: EventBus, capacity: int = 256) -> None:
        self._bus = bus
        self._records: deque[RequestRecord] = deque(maxlen=capacity)
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()

    def start(self, model: str, kind: str = "chatcmpl") -> RequestRecord:
        record = RequestRecord(id=f"{kind}-{self._prefix}{next(self._ids):06d}", model=model)
        self._records.append(record)
        self._bus.publish("request.started", **self._event(record))
        return record

    def finish(self, record: RequestRecord, status: str) -> None:
        if record.finished is not None:
            return
        record.status = status
        record.finished = time.time()
        self._bus.publish("request.finished", **self._event(record))

    def _event(self, record: RequestRecord) -> dict[str, Any]:
        data = record.to_dict()
        return {k: data[k] for k in ("id", "model", "route", "ttft_ms", "tokens", "tok_s", "status")}

    def pipelines(self) -> list[dict[str, Any]]:
        """Running requests served by peers (offload or split), with the peer and layer span of each stage."""
        running = []
        for record in self._records:
            route = record.route
            if record.status != "running" or route.get("kind") not in ("offload", "split"):
                continue
            stages = [{"peer": peer, "span": span}
                      for peer, span in zip(route.get("peers", []), route.get("spans", []), strict=False)]
            running.append({"request": record.id, "kind": route["kind"], "stages": stages})
        return running

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        records = list(self._records)
        if limit is not None:
            records = records[-limit:]
        return [r.to_dict() for r in records]
