"""Standby spans: the parts of a model a re-plan would need are loaded ahead of need, here and on peers.

When a split with stages on peers starts, the router asks the planner what it would do without each of those
peers (a plan is pure arithmetic) and hands the spans of such a plan to `Standby`, which has them loaded in
the background — one at a time, never more than `MAX_PENDING` waiting: this node's own into its `StageHost`
(skipped when held, or when the host has no room left for one more idle stage), a peer's by opening a
sequence on that span and closing it at once (the peer then keeps the loaded stage as an idle one); a span is
asked for again only after `MEMO_S`, so the host's trimming of idle stages (least recently used first: a
standby stage that was never used goes first) cannot turn into a reload per request. If a peer is then lost
mid-stream, its replacement is a stage already loaded (or compiled), so the recovery costs a re-plan and a
replay instead of a load. `[split] standby_spans` turns it off; a host keeps at most `keep_idle_stages` idle
stages, so standby spans cost bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.mesh.split import wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.ports import MeshHandle
from shoal.mesh.split.remote_stage import next_wire_seq
from shoal.models.span import LayerSpan

logger = logging.getLogger(__name__)

MAX_PENDING = 8
"""Spans waiting to be loaded; more requests are dropped (they are only a head start)."""
MEMO_S = 300.0
"""A span loaded (or asked of a peer) is not asked for again for this long."""
MAX_MEMO = 256

Load = Callable[[str, LayerSpan, "str | None"], Awaitable[Any]]
"""Load (or find loaded) model `name`'s `span` on this node's stage host."""
Held = Callable[[str, LayerSpan], bool]
"""Whether the stage host holds (or is loading) that span already."""
RemoteLoad = Callable[[str, str, LayerSpan, "str | None"], Awaitable[Any]]
"""Have peer `peer` load model `name`'s `span` (open a sequence on it, close it)."""
LOCAL = "local"


class Standby:
    """A bounded, one-at-a-time background loader of spans this node may be asked to run."""

    def __init__(self, load: Load, held: Held, remote: RemoteLoad | None = None,
                 room: Callable[[], int] | None = None) -> None:
        """`room()`: how many more idle stages this node's host keeps (no local load without room)."""
        self._load = load
        self._held = held
        self._room = room
        self._remote = remote
        self._queue: asyncio.Queue[tuple[str, str, LayerSpan, str | None]] = asyncio.Queue(MAX_PENDING)
        self._wanted: set[tuple[str, str, LayerSpan]] = set()
        self._asked: dict[tuple[str, str, LayerSpan], float] = {}
        self._task: asyncio.Task[None] | None = None
        self.loaded: list[tuple[str, str]] = []
        """(model, span) of every standby load finished here, (peer:model, span) on peers (tests, the log)."""

    def want(self, model: str, span: LayerSpan, cid: str | None = None, peer: str = LOCAL) -> bool:
        """Queue `span` of `model` for loading on `peer` (this node: `local`); False when it is held (asked
        of a peer lately), queued, or the queue is full."""
        key = (peer, model, span)
        now = time.monotonic()
        if key in self._wanted or now - self._asked.get(key, -1e9) < MEMO_S:
            return False
        if peer == LOCAL and (self._held(model, span) or (self._room is not None and self._room() <= 0)):
            return False
        if peer != LOCAL and self._remote is None:
            return False
        try:
            self._queue.put_nowait((peer, model, span, cid))
        except asyncio.QueueFull:
            return False
        if len(self._asked) >= MAX_MEMO:
            self._asked.clear()
        self._asked[key] = now
        self._wanted.add(key)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="standby spans")
        return True

    async def _run(self) -> None:
        while not self._queue.empty():
            peer, model, span, cid = self._queue.get_nowait()
            try:
                if peer != LOCAL and self._remote is not None:
                    await self._remote(peer, model, span, cid)
                    self.loaded.append((f"{peer}:{model}", str(span)))
                elif peer == LOCAL and not self._held(model, span):
                    await self._load(model, span, cid)
                    self.loaded.append((model, str(span)))
                else:
                    continue
                logger.info("standby: %s layers %s loaded on %s ahead of a possible re-plan", model, span,
                            peer[:12])
            except Exception as exc:  # a head start only: a span that cannot load there is skipped
                logger.info("standby: %s layers %s not loaded on %s: %s", model, span, peer[:12], exc)
            finally:
                self._wanted.discard((peer, model, span))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def remote_loader(mesh: MeshHandle, settings: SplitConfig) -> RemoteLoad:
    """Has a peer load a span: opens a sequence on it (the peer loads, fetches or compiles the span) and
    closes it at once (nothing was computed: no receipt); the peer keeps the stage as an idle one."""
    async def load(peer: str, model: str, span: LayerSpan, cid: str | None) -> None:
        link = mesh.peer(peer)
        body: dict[str, Any] = {"model": model, "span": str(span), "seq": next_wire_seq()}
        if cid:
            body["cid"] = cid
        await link.request(wire.STAGE_OPEN, body, settings.open_timeout_s)
        await link.request(wire.STAGE_CLOSE, {"seq": body["seq"]}, settings.control_timeout_s)
    return load
