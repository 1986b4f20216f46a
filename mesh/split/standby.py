"""Standby spans: this node loads, ahead of need, the parts of a model a re-plan would give it.

When a split with stages on peers starts, the router asks the planner what it would do without each of those
peers (a plan is pure arithmetic) and hands the spans such a plan puts on this node to `Standby`, which loads
them into the `StageHost` in the background — one at a time, never more than `MAX_PENDING` waiting, and only
spans the host does not hold yet. If a peer is then lost mid-stream, its replacement is a stage already loaded
(or compiled), so the recovery costs a re-plan and a replay instead of a load. `[split] standby_spans` turns
it off; the host keeps at most `keep_idle_stages` idle stages, so standby spans cost bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.models.span import LayerSpan

logger = logging.getLogger(__name__)

MAX_PENDING = 8
"""Spans waiting to be loaded; more requests are dropped (they are only a head start)."""

Load = Callable[[str, LayerSpan, "str | None"], Awaitable[Any]]
"""Load (or find loaded) model `name`'s `span` on this node's stage host."""
Held = Callable[[str, LayerSpan], bool]
"""Whether the stage host holds (or is loading) that span already."""


class Standby:
    """A bounded, one-at-a-time background loader of spans this node may be asked to run."""

    def __init__(self, load: Load, held: Held) -> None:
        self._load = load
        self._held = held
        self._queue: asyncio.Queue[tuple[str, LayerSpan, str | None]] = asyncio.Queue(MAX_PENDING)
        self._wanted: set[tuple[str, LayerSpan]] = set()
        self._task: asyncio.Task[None] | None = None
        self.loaded: list[tuple[str, str]] = []
        """(model, span) of every standby load finished (for tests and the log)."""

    def want(self, model: str, span: LayerSpan, cid: str | None = None) -> bool:
        """Queue `span` of `model` for loading; False when it is held, queued, or the queue is full."""
        key = (model, span)
        if key in self._wanted or self._held(model, span):
            return False
        try:
            self._queue.put_nowait((model, span, cid))
        except asyncio.QueueFull:
            return False
        self._wanted.add(key)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="standby spans")
        return True

    async def _run(self) -> None:
        while not self._queue.empty():
            model, span, cid = self._queue.get_nowait()
            try:
                if not self._held(model, span):
                    await self._load(model, span, cid)
                    self.loaded.append((model, str(span)))
                    logger.info("standby: %s layers %s loaded ahead of a possible re-plan", model, span)
            except Exception as exc:  # a head start only: a span that cannot load here is skipped
                logger.info("standby: %s layers %s not loaded: %s", model, span, exc)
            finally:
                self._wanted.discard((model, span))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
