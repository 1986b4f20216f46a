"""Long waits on peers: telling a dead peer from a slow one in well under the mesh's heartbeat timeout, and
telling the request's client what it waits for (`mesh.route.Route.progress`, once a second).

A peer killed mid-request sends nothing more; over a data channel nothing says so until the mesh's heartbeats
give up on the link (`[mesh] dead_timeout_s`, 4 s). A request knows better what to expect: its replies (a
token of an offload, a stage's answer to a call) come at a steady pace. `ReplyClock` learns that pace per
request; once a silence lasts `suspect_factor` typical gaps (at least `suspect_floor_s`) and the peer has
not answered a ping sent halfway through that silence, within the rest of it plus the probe's wait, the peer
is lost (`await_reply`). A peer that is busy computing still answers pings from its event loop, so it is
waited for, up to the call's own timeout.

The verdict is robust to load without slowing the detection of a dead peer on a quiet machine (the loss
rule: `probe_wait`, `lost`): the ping goes out halfway through the suspect silence, so its answer has that
half too, yet the verdict comes when it did with a ping at the end; the probe's wait is `probe_timeout_s`, at
least 4 RTTs and 2 typical reply gaps (a peer whose steps are slow is one whose loop may answer late); and
it is stretched by however long this node's own event loop stalled meanwhile (waits that ended over 20 ms
late), up to half the wait: on a loaded machine this process is descheduled too, and an answer that arrived
may sit unread. Before the verdict the loop gets a few turns to read frames already received. (A second ping
would add nothing: the channel is reliable and ordered, so a late peer answers the first.)
Only a request that has had a reply is watched this way: before it (a `stage.open`, a first prefill, an
offload's first token) the peer may be loading or compiling, which can hold its event loop for seconds, so
there only the mesh's heartbeats count.

An offload waits for each of its tokens through `next_reply` on an `Inbox`: one future a token, and one timer
for the whole request that wakes the wait when a silence reaches its early ping; from there `await_reply`'s
rule goes on, counting the silence from the wait's start (the relay's per-token cost, docs/split.md).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from shoal.mesh.p2p.errors import MeshError
from shoal.mesh.route import Route
from shoal.mesh.split.config import SplitConfig
from shoal.models.span import LayerSpan

T = TypeVar("T")

PROBE_POLL_S = 0.005
"""How often a probe checks whether the peer was heard from."""
STALL_SLACK_S = 0.02
"""A wait that ends this much later than asked is normal jitter on a busy machine; more counts as this loop
stalling (long enough for a received answer to sit unread)."""
EARLY_PING = 0.5
"""Share of the suspect silence after which the peer is pinged: the verdict still comes after the whole
silence plus the probe's wait, but the answer has had the rest of the silence too."""
DRAIN_TURNS = 4
"""Loop turns a probe yields at its deadline, so frames already received are read before the verdict."""
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

    def typical(self) -> float | None:
        """The median gap between this request's replies (None before the first)."""
        return statistics.median(self._gaps) if self._gaps else None

    def suspect_after(self) -> float | None:
        """None until a reply was seen: nothing to compare a silence with yet (never ping then)."""
        if not self._gaps:
            return None
        return max(self.floor_s, self.factor * statistics.median(self._gaps))


def probe_wait(timeout_s: float, rtt_s: float | None = None, typical_gap_s: float | None = None) -> float:
    """How long a pinged peer has to answer before this node's own stalls are counted: `timeout_s`
    (`[split] probe_timeout_s`), at least 4 RTTs of the link and 2 typical gaps between the request's
    replies."""
    return max(timeout_s, 4 * (rtt_s or 0.0), 2 * (typical_gap_s or 0.0))


def lost(waited_s: float, wait_s: float, stalled_s: float) -> bool:
    """The loss rule: a peer silent to a ping for `waited_s` is lost once that reaches `wait_s` plus the time
    this node's event loop stalled meanwhile (`stalled_s`, counted up to half of `wait_s`: a loop
    descheduled on a loaded machine reads the answer late, but a dead peer is still declared within 1.5
    waits)."""
    return waited_s >= wait_s + min(max(0.0, stalled_s), wait_s / 2)


def max_probe_s(timeout_s: float, rtt_s: float | None = None, typical_gap_s: float | None = None) -> float:
    """The longest a probe (`heard_from`) can take, for callers that wait on it from another thread."""
    return 1.5 * probe_wait(timeout_s, rtt_s, typical_gap_s)


def overshoot(took_s: float, asked_s: float) -> float:
    """How much of a wait of `asked_s` that took `took_s` was this loop stalling (beyond normal jitter)."""
    return max(0.0, took_s - asked_s - STALL_SLACK_S)


async def ping(link: Probed) -> float | None:
    """Ping the peer; the `time.monotonic()` it was sent at, or None when the link cannot send."""
    sent = time.monotonic()
    try:
        await link.notify("ping", {"t": sent})
    except MeshError:
        return None
    return sent


async def answered(link: Probed, sent: float, wait_s: float, stalled_s: float = 0.0,
                   done: Callable[[], bool] = lambda: False) -> bool:
    """True once anything arrives from the peer after `sent` (a ping's time), or `done()` (what the caller
    waits for came meanwhile); False once `lost` says so, counting this loop's stalls from `stalled_s` on."""
    stalled = stalled_s
    while link.last_seen < sent and not done():
        before = time.monotonic()
        if lost(before - sent, wait_s, stalled):
            for _ in range(DRAIN_TURNS):  # frames already received: let the loop read them first
                await asyncio.sleep(0)
            return link.last_seen >= sent or done()
        await asyncio.sleep(PROBE_POLL_S)
        stalled += overshoot(time.monotonic() - before, PROBE_POLL_S)
    return True


async def heard_from(link: Probed, timeout_s: float, typical_gap_s: float | None = None) -> bool:
    """Ping the peer; True when anything at all arrives from it before `lost` says it is lost (the wait is
    `probe_wait(timeout_s, the link's RTT, typical_gap_s)`, stretched by this loop's own stalls)."""
    sent = await ping(link)
    return sent is not None and await answered(link, sent, probe_wait(timeout_s, link.rtt_s, typical_gap_s))


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
                      timeout_s: float | None = None, report: Report | None = None,
                      began: float | None = None) -> T:
    """`reply`'s result. Raises `PeerSilent` when the peer stays silent past `clock.suspect_after()` and does
    not answer a ping sent halfway through that silence (`EARLY_PING`) within the rest of it plus the probe's
    wait (`probe_wait`, `lost`); `TimeoutError` past `timeout_s` (None: no limit but the peer's silence).
    Before the request's first reply (nothing to compare a silence with), `report` hears of the wait each
    second. `began`: the loop time the wait began, when that was before this call (`next_reply`)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(reply)
    began = loop.time() if began is None else began
    deadline = None if timeout_s is None else began + timeout_s

    async def done_within(seconds: float | None) -> bool:
        if deadline is not None:
            left = deadline - loop.time()
            seconds = left if seconds is None else min(seconds, left)
        finished, _ = await asyncio.wait({task}, timeout=None if seconds is None else max(0.0, seconds))
        if finished:
            clock.observe(loop.time() - began)
            return True
        if deadline is not None and loop.time() >= deadline:
            raise TimeoutError
        return False

    quiet_from = began  # when the silence being judged began (a ping answered starts another)
    try:
        while True:
            suspect = clock.suspect_after()
            if suspect is None:  # no reply yet: nothing to compare a silence with, only report the wait
                if await done_within(REPORT_EVERY_S if report is not None else None):
                    return task.result()
                if report is not None:
                    report(loop.time() - began)
                continue
            early = suspect * EARLY_PING
            if await done_within(max(0.0, quiet_from + early - loop.time())):
                return task.result()
            sent = await ping(link)  # halfway: the answer has the rest of the silence too
            rest = suspect - early
            asked = loop.time()
            if await done_within(rest):
                return task.result()
            stalled = overshoot(loop.time() - asked, rest)
            wait = rest + probe_wait(probe_timeout_s, link.rtt_s, clock.typical())
            if (sent is None or not await answered(link, sent, wait, stalled, task.done)) and not task.done():
                raise PeerSilent(f"silent for {loop.time() - began:.2f} s and did not answer a ping")
            if task.done():
                clock.observe(loop.time() - began)
                return task.result()
            quiet_from = loop.time()
    finally:
        if not task.done():
            task.cancel()


class Inbox(Generic[T]):
    """One request's replies, in order, for one consumer (`next_reply`): `put` never waits, and a wait is
    one future — no task per reply, as `asyncio.Queue.get` under `asyncio.wait` needs — with one timer for
    the whole request that wakes the waiter once a silence reaches its early ping (`wake_at`)."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pop(self) -> T:
        return self._items.popleft()

    async def wait(self) -> None:
        """Until an item is here, or the time given to `wake_at` passed."""
        if self._items:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def get(self) -> T:
        """The next item (cancellable: an item that came meanwhile stays for the next call)."""
        while not self._items:
            await self.wait()
        return self._items.popleft()

    def wake_at(self, when: float) -> None:
        """Wake the wait once the loop's clock reaches `when`, if no item came first. The timer is kept
        across waits and moved on when it fires early, so a reply costs no timer of its own."""
        self._due = when
        timer = self._timer
        if timer is not None and timer.when() <= when:
            return  # fires sooner, then moves itself to `_due`
        if timer is not None:
            timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # no wait now: the next one arms the timer again
        loop = waiter.get_loop()
        if loop.time() >= self._due:
            waiter.set_result(None)
        else:
            self._timer = loop.call_at(self._due, self._fire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def next_reply(inbox: Inbox[T], link: Probed, clock: ReplyClock, probe_timeout_s: float,
                     timeout_s: float | None = None, report: Report | None = None) -> T:
    """`await_reply(inbox.get(), ...)` at a reply's cost: one future while the reply comes before the
    silence's early ping (`EARLY_PING` × `clock.suspect_after()`, or `timeout_s` if sooner); past that, the
    same rule as `await_reply` takes over, counting the silence from when this wait began. An item already
    there is returned at once (no gap observed, as before a wait)."""
    if len(inbox):
        return inbox.pop()
    suspect = clock.suspect_after()
    if suspect is None or report is not None:  # before the first reply: the reporting wait
        return await await_reply(inbox.get(), link, clock, probe_timeout_s, timeout_s, report)
    loop = asyncio.get_running_loop()
    began = loop.time()
    early = suspect * EARLY_PING if timeout_s is None else min(suspect * EARLY_PING, timeout_s)
    inbox.wake_at(began + early)
    await inbox.wait()
    if len(inbox):
        clock.observe(loop.time() - began)
        return inbox.pop()
    return await await_reply(inbox.get(), link, clock, probe_timeout_s, timeout_s, began=began)


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
