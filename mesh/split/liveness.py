"""Long waits on peers: telling a dead peer from a slow one in well under the mesh's heartbeat timeout, and
telling the request's client what it waits for (`mesh.route.Route.progress`, once a second).

A peer killed mid-request sends nothing more; over a data channel nothing says so until the mesh's heartbeats
give up on the link (`[mesh] dead_timeout_s`, 4 s). A request knows better what to expect: its replies (a
token of an offload, a stage's answer to a call) come at a steady pace. `ReplyClock` learns that pace per
request; once a silence lasts `suspect_factor` typical gaps (at least `suspect_floor_s`), `await_reply` pings
the peer, and a peer that answers nothing within `probe_timeout_s` (at least 4 RTTs) is lost. A peer that is
busy computing still answers pings from its event loop, so it is waited for, up to the call's own timeout.
Only a request that has had a reply is watched this way: before it (a `stage.open`, a first prefill, an
offload's first token) the peer may be loading or compiling, which can hold its event loop for seconds, so
there only the mesh's heartbeats count.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from shoal.mesh.p2p.errors import MeshError
from shoal.mesh.route import Route
from shoal.mesh.split.config import SplitConfig
from shoal.models.span import LayerSpan

T = TypeVar("T")

PROBE_POLL_S = 0.005
"""How often a probe checks whether the peer was heard from."""
REPORT_EVERY_S = 1.0
"""How often a long wait is reported to the request's client (`Route.progress`)."""
Report = Callable[[float], None]
"""Called with the seconds waited so far, every `REPORT_EVERY_S` of a long wait."""


class Probed(Protocol):
    """What a probe needs of a link (`p2p.peer.Peer`): when it last heard from the peer, and a way to ping."""

    peer_id: str
    last_seen: float
    """`time.monotonic()` of the last message received from the peer."""
    rtt_s: float | None

    async def notify(self, frame_type: str, body: dict[str, Any]) -> None: ...


class PeerSilent(Exception):
    """The peer answered neither the awaited reply nor a ping in time."""


@dataclass(frozen=True)
class Watch:
    """How a request watches its peer (`[split] suspect_floor_s`, `suspect_factor`, `probe_timeout_s`)."""

    floor_s: float = SplitConfig.suspect_floor_s
    factor: float = SplitConfig.suspect_factor
    probe_timeout_s: float = SplitConfig.probe_timeout_s

    @classmethod
    def from_config(cls, config: SplitConfig) -> Watch:
        return cls(config.suspect_floor_s, config.suspect_factor, config.probe_timeout_s)

    def clock(self) -> ReplyClock:
        return ReplyClock(self.floor_s, self.factor)


class ReplyClock:
    """The usual time between replies of one request; `suspect_after` is how long a silence may last before
    the peer is pinged."""

    def __init__(self, floor_s: float, factor: float, window: int = 16) -> None:
        self.floor_s = floor_s
        self.factor = factor
        self._gaps: deque[float] = deque(maxlen=window)

    def observe(self, seconds: float) -> None:
        self._gaps.append(seconds)

    def suspect_after(self) -> float | None:
        """None until a reply was seen: nothing to compare a silence with yet (never ping then)."""
        if not self._gaps:
            return None
        return max(self.floor_s, self.factor * statistics.median(self._gaps))


async def heard_from(link: Probed, timeout_s: float) -> bool:
    """Ping the peer; True when anything at all arrives from it within `timeout_s` (at least 4 RTTs)."""
    sent = time.monotonic()
    try:
        await link.notify("ping", {"t": sent})
    except MeshError:
        return False
    wait = max(timeout_s, 4 * (link.rtt_s or 0.0))
    deadline = sent + wait
    while time.monotonic() < deadline:
        if link.last_seen >= sent:
            return True
        await asyncio.sleep(PROBE_POLL_S)
    return link.last_seen >= sent


async def reporting(waited: Awaitable[T], report: Report | None, every_s: float = REPORT_EVERY_S) -> T:
    """`waited`'s result; until it is done, `report(seconds so far)` every `every_s` (None: just await)."""
    if report is None:
        return await waited
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(waited)
    began = loop.time()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every_s)
            if done:
                return task.result()
            report(loop.time() - began)
    finally:
        if not task.done():
            task.cancel()


async def await_reply(reply: Awaitable[T], link: Probed, clock: ReplyClock, probe_timeout_s: float,
                      timeout_s: float | None = None, report: Report | None = None) -> T:
    """`reply`'s result. Raises `PeerSilent` when the peer stays silent past `clock.suspect_after()` and then
    does not answer a ping; `TimeoutError` past `timeout_s` (None: no limit but the peer's silence). Before
    the request's first reply (nothing to compare a silence with), `report` hears of the wait each second."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(reply)
    began = loop.time()
    deadline = None if timeout_s is None else began + timeout_s
    try:
        while True:
            wait = clock.suspect_after()
            if wait is None and report is not None:
                wait = REPORT_EVERY_S
            if deadline is not None:
                left = deadline - loop.time()
                wait = left if wait is None else min(wait, left)
            done, _ = await asyncio.wait({task}, timeout=None if wait is None else max(0.0, wait))
            if done:
                clock.observe(loop.time() - began)
                return task.result()
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError
            if clock.suspect_after() is None:
                if report is not None:
                    report(loop.time() - began)
                continue
            if not await heard_from(link, probe_timeout_s) and not task.done():
                raise PeerSilent(f"silent for {loop.time() - began:.2f} s and did not answer a ping")
    finally:
        if not task.done():
            task.cancel()


def local_load_report(route: Route, span: LayerSpan) -> Report:
    """Tells `route`'s client that this node is loading (or compiling) its part of a split."""
    def report(seconds: float) -> None:
        route.progress(f"loading layers {span} here ({seconds:.0f} s)", waiting="local_load",
                       layers=str(span), seconds=round(seconds, 1))
    return report


def offload_wait_report(route: Route, peer: str) -> Callable[[str, float], None]:
    """Tells `route`'s client what an offload waits for: the peer taking the request, or its first token."""
    def report(what: str, seconds: float) -> None:
        if what == "open":
            message = f"waiting for peer {peer[:12]} to take the request; it may be loading the model"
        else:
            message = f"waiting for peer {peer[:12]}'s first token"
        route.progress(f"{message} ({seconds:.0f} s)", waiting="peer_start", peer=peer,
                       seconds=round(seconds, 1))
    return report
