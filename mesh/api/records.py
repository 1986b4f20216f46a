"""One completion request's record: its route, status and timings, filled in by the completion handler as
tokens arrive (the node's request log keeps the newest ones)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shoal.mesh.route import Route


@dataclass
class RequestRecord:
    """One request's life: filled in by the API handler as tokens arrive."""

    id: str
    model: str
    route: Route = field(default_factory=Route)
    """Where it runs (filled in by the router); serialized here, once, for the response and the log."""
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

    def finish(self, status: str) -> bool:
        """End the request with `status`, now; False (and no change) when it had ended already."""
        if self.finished is not None:
            return False
        self.status, self.finished = status, time.time()
        return True

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
            "route": self.route.to_dict(),
            "status": self.status,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 3),
            "tokens": self.tokens,
            "tok_s": None if self.tok_s is None else round(self.tok_s, 3),
            "started": self.started,
            "finished": self.finished,
        }
