"""The node's event bus: subsystems publish typed events; the API streams them to the TUI (`GET /v1/events`).

An event is `{"seq": int, "time": float, "kind": "pull.progress", "data": {...}}`. Kinds are dotted
`<area>.<what>` names (`pull.progress`, `compile.progress`, `peer.joined`, `request.finished`, `log`, ...).
Each subscriber has a bounded queue; a subscriber that falls behind loses its oldest events (and is told how
many through a `bus.dropped` event) instead of slowing the node down.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_QUEUE_SIZE = 1024
RECENT_EVENTS = 256


@dataclass(frozen=True)
class Event:
    seq: int
    time: float
    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind, "data": self.data}


class Subscription:
    """One subscriber's bounded view of the bus. Iterate it with `async for`; `close()` detaches it."""

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: deque[Event] = deque()
        self._maxsize = maxsize
        self._dropped = 0
        self._wakeup = asyncio.Event()
        self._closed = False

    def _offer(self, event: Event) -> None:
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self._dropped += 1
        self._queue.append(event)
        self._wakeup.set()

    async def get(self) -> Event:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            return Event(-1, time.time(), "bus.dropped", {"count": dropped})
        return self._queue.popleft()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._bus._subscribers.discard(self)


class EventBus:
    """Fan-out of node events. `publish` never blocks and may be called from any thread."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self._seq = itertools.count(1)
        self._recent: deque[Event] = deque(maxlen=RECENT_EVENTS)
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the node's loop so worker threads can publish safely."""
        self._loop = loop

    def publish(self, kind: str, **data: Any) -> None:
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and running is not loop:
            loop.call_soon_threadsafe(self._deliver, kind, data)
        else:
            self._deliver(kind, data)

    def _deliver(self, kind: str, data: dict[str, Any]) -> None:
        event = Event(next(self._seq), time.time(), kind, data)
        self._recent.append(event)
        for subscriber in list(self._subscribers):
            subscriber._offer(event)

    def subscribe(self, maxsize: int = DEFAULT_QUEUE_SIZE, replay: bool = False) -> Subscription:
        subscription = Subscription(self, maxsize)
        if replay:
            for event in self._recent:
                subscription._offer(event)
        self._subscribers.add(subscription)
        return subscription

    def recent(self, kind_prefix: str = "") -> list[Event]:
        return [e for e in self._recent if e.kind.startswith(kind_prefix)]

    def close(self) -> None:
        for subscriber in list(self._subscribers):
            subscriber.close()
