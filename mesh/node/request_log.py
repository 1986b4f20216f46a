"""Recent completion requests (`GET /v1/mesh/requests`) and their `request.started/finished` events."""

from __future__ import annotations

import itertools
import os
from collections import deque
from typing import Any

from shoal.mesh.api.records import RequestRecord
from shoal.mesh.events import EventBus


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
        if not record.finish(status):
            return
        self._bus.publish("request.finished", **self._event(record))

    def _event(self, record: RequestRecord) -> dict[str, Any]:
        data = record.to_dict()
        return {k: data[k] for k in ("id", "model", "route", "ttft_ms", "tokens", "tok_s", "status")}

    def pipelines(self) -> list[dict[str, Any]]:
        """Running requests served by peers (offload or split), with the peer and layer span of each stage."""
        running = []
        for record in self._records:
            route = record.route
            if record.status != "running" or route.kind not in ("offload", "split"):
                continue
            stages = [{"peer": peer, "span": span}
                      for peer, span in zip(route.peers, route.spans, strict=False)]
            running.append({"request": record.id, "kind": route.kind, "stages": stages})
        return running

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        records = list(self._records)
        if limit is not None:
            records = records[-limit:]
        return [r.to_dict() for r in records]
