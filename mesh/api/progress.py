"""Progress of a streamed request while its client waits: no silent waits.

The router, the split pipeline and remote stages report through the request's `Route.progress` (a peer
loading or compiling the layers it will run, this node loading its own part, a peer about to start an
offloaded request, a lost peer being replaced); the node's event bus adds this node's own compile progress
for the model; the engine's admission queue says how many requests wait for room. `ProgressPump` turns all of
it into lines a dialect writes as it can — the OpenAI and Anthropic streams as SSE comments
(`: shoal progress {json}`), which every SSE client, the official `openai` and `anthropic` libraries
included, skips. Before the first token the stream is opened for the first report (so a client sees why it
waits); after it only re-plans are reported, between token chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from shoal.mesh.api.keys import NODE
from shoal.mesh.api.sse import SseWriter, open_sse
from shoal.mesh.events import EventBus

TICK_S = 1.0
"""While no token is out, the longest time without a report (a plain "still waiting" when nothing else
said anything)."""
MAX_PENDING = 64
"""Reports kept while the stream writes (the oldest are dropped past this)."""
PREFIX = "shoal progress "
EARLY_STREAM: Any = web.RequestKey("shoal.early_stream", SseWriter) if hasattr(web, "RequestKey") \
    else "shoal.early_stream"  # aiohttp before 3.12: a plain key
"""The request's key for an SSE response opened while the model was still loading (`while_loading`); the
dialect's framer writes into it instead of opening another."""
T = TypeVar("T")

logger = logging.getLogger(__name__)


def comment_text(report: dict[str, Any]) -> str:
    """The text of the SSE comment line for one report (the line is `: ` + this)."""
    return PREFIX + orjson.dumps(report).decode()


class ProgressFeed:
    """Reports for one request; `push` may be called from any thread (a split runs on the engine's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.get_ident()
        self._items: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING)
        self._ready = asyncio.Event()

    def push(self, report: dict[str, Any]) -> None:
        if threading.get_ident() == self._thread:
            self._put(report)
        else:
            self._loop.call_soon_threadsafe(self._put, report)

    def _put(self, report: dict[str, Any]) -> None:
        self._items.append(report)
        self._ready.set()

    async def wait(self, timeout_s: float) -> list[dict[str, Any]]:
        """The reports pushed so far (waiting up to `timeout_s` for one)."""
        if not self._items:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._ready.wait()
        items = list(self._items)
        self._items.clear()
        return items


class ProgressPump:
    """Writes a request's reports through `write` (a dialect's progress line) until stopped. `first_token()`
    marks the end of the wait: from then on only reports pushed to the feed (re-plans) are written."""

    def __init__(self, feed: ProgressFeed, write: Callable[[dict[str, Any]], Awaitable[None]], *,
                 model: str, bus: EventBus | None = None, queue_depth: Callable[[], int] | None = None,
                 idle: Callable[[float], dict[str, Any]] | None = None, started: float | None = None) -> None:
        """`idle(seconds)`: the report of a tick with nothing else to say (default: the queue, or still
        waiting for the first token); `started`: when the wait began (`time.monotonic()`; default now)."""
        self.feed = feed
        self._idle = idle
        self._write = write
        self._model = model
        self._bus = bus
        self._queue_depth = queue_depth
        self._waiting = True
        self._started = time.monotonic() if started is None else started
        self._task: asyncio.Task[None] | None = None
        self.sent = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="progress")

    def first_token(self) -> None:
        self._waiting = False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        subscription = self._bus.subscribe(maxsize=MAX_PENDING) if self._bus is not None else None
        forward = asyncio.get_running_loop().create_task(self._compile_events(subscription)) \
            if subscription is not None else None
        last = time.monotonic()
        try:
            while True:
                reports = await self.feed.wait(TICK_S)
                now = time.monotonic()
                if not reports and self._waiting and now - last >= TICK_S:
                    reports = [self._still_waiting(now)]
                for report in reports:
                    try:
                        await self._write(report)
                    except ConnectionResetError:
                        return  # the client went away: the stream's own writes will say so
                    except Exception:  # a task boundary: progress must never break the answer
                        logger.exception("writing a progress report failed; no more reports")
                        return
                    self.sent += 1
                    last = now
        finally:
            if forward is not None:
                forward.cancel()
            if subscription is not None:
                subscription.close()

    def _still_waiting(self, now: float) -> dict[str, Any]:
        seconds = round(now - self._started, 1)
        if self._idle is not None:
            return self._idle(seconds)
        depth = self._queue_depth() if self._queue_depth is not None else 0
        if depth:
            return {"message": f"queued for room in the KV cache, {depth} waiting ({seconds:.0f} s)",
                    "waiting": "queue", "queued": depth, "seconds": seconds}
        return {"message": f"waiting for the first token ({seconds:.0f} s)", "waiting": "first_token",
                "seconds": seconds}

    async def _compile_events(self, subscription: Any) -> None:
        """This node's compile progress for the model, while no token is out (a split's own part, a span)."""
        async for event in subscription:
            if not self._waiting:
                return
            data = event.data
            if event.kind != "compile.progress" or data.get("model") != self._model:
                continue
            fraction = float(data.get("fraction") or 0.0)
            span = data.get("span")
            what = f"layers {span}" if span else "the model"
            text = f"compiling {what} here: {fraction * 100:.0f}% {data.get('message') or ''}".rstrip()
            seconds = round(time.monotonic() - self._started, 1)
            self.feed.push({"message": text, "waiting": "local_load", "layers": span,
                            "fraction": round(fraction, 3), "seconds": seconds})


async def while_loading(request: web.Request, work: Awaitable[T], model: str) -> T:
    """`work`'s result (preparing a streamed request: loading, maybe compiling, its model). When it takes
    longer than `TICK_S`, the SSE response opens (kept under `EARLY_STREAM`) and the wait is reported: this
    node's compile progress for the model, else "loading MODEL here (n s)" each second."""
    began = time.monotonic()
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=TICK_S)
    if done:
        return task.result()
    sse: SseWriter = await open_sse(request)
    request[EARLY_STREAM] = sse

    async def write(report: dict[str, Any]) -> None:
        await sse.comment(comment_text(report))

    def idle(seconds: float) -> dict[str, Any]:
        return {"message": f"loading {model} here ({seconds:.0f} s)", "waiting": "model_load",
                "seconds": seconds}

    pump = ProgressPump(ProgressFeed(asyncio.get_running_loop()), write, model=model,
                        bus=request.app[NODE].bus, idle=idle, started=began)
    pump.feed.push(idle(TICK_S))
    pump.start()
    try:
        return await task
    finally:
        await pump.stop()
