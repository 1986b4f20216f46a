"""Follow a node: connect, stream its events, reconnect with capped exponential back-off when it goes away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoal.tui.client import NodeClient, NodeError, NotAvailable

logger = logging.getLogger(__name__)

StateCallback = Callable[[str, dict[str, Any] | None], None]
EventCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: `first` seconds, doubled after each failure, never above `cap`."""

    first: float = 0.5
    cap: float = 5.0
    poll: float = 2.0
    """Health-poll period when the node has no event stream."""

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError("Backoff needs 0 < first <= cap")

    def delay(self, failures: int) -> float:
        return min(self.cap, self.first * 2 ** max(0, failures - 1))


async def follow_node(
    client: NodeClient, on_state: StateCallback, on_event: EventCallback, backoff: Backoff | None = None
) -> None:
    """Run until cancelled. Calls `on_state("connected", health)` on each (re)connect and
    `on_state("disconnected", None)` when the node stops answering; passes each event to `on_event`."""
    backoff = backoff or Backoff()
    failures = 0
    while True:
        try:
            health = await client.health()
            on_state("connected", health)
            failures = 0
            try:
                async for event in client.events():
                    on_event(event)
            except NotAvailable:
                while True:  # an older node without /v1/events: poll health to notice restarts
                    await asyncio.sleep(backoff.poll)
                    await client.health()
            failures = 1  # the node closed the stream: it is probably restarting
        except NodeError as exc:
            failures += 1
            logger.debug("node %s unreachable: %s", client.base_url, exc)
        on_state("disconnected", None)
        await asyncio.sleep(backoff.delay(failures))
