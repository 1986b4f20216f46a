"""The loss rule of `split.liveness`: a silent peer is pinged halfway through the suspect silence and lost
only after the rest of it plus the probe's wait (the probe timeout, at least 4 RTTs and 2 typical reply gaps)
plus this node's own loop stalls (up to half that), so a peer answering late on a loaded machine is kept
while a dead one is still declared lost.

The peer here is a link whose answer to a ping arrives after a set time, or never (the injected fault); the
stall is a blocking sleep on this test's own event loop, as a descheduled process would see."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from shoal.mesh.split.liveness import (
    Inbox,
    PeerSilent,
    ReplyClock,
    await_reply,
    heard_from,
    lost,
    max_probe_s,
    next_reply,
    probe_wait,
)


class LateLink:
    """A link whose peer answers each ping `answer_after_s` later (None: never: a dead peer)."""

    def __init__(self, answer_after_s: float | None, rtt_s: float | None = None) -> None:
        self.peer_id = "p5uapeer"
        self.last_seen = 0.0
        self.rtt_s = rtt_s
        self.answer_after_s = answer_after_s
        self.pings = 0

    async def notify(self, frame_type: str, body: dict[str, Any]) -> None:
        assert frame_type == "ping"
        self.pings += 1
        if self.answer_after_s is not None:
            asyncio.get_running_loop().call_later(self.answer_after_s, self._heard)

    def _heard(self) -> None:
        self.last_seen = time.monotonic()


def test_the_wait_is_the_timeout_at_least_four_rtts_and_two_reply_gaps():
    assert probe_wait(0.4) == 0.4
    assert probe_wait(0.4, rtt_s=0.2) == pytest.approx(0.8)
    assert probe_wait(0.4, rtt_s=0.01, typical_gap_s=0.35) == pytest.approx(0.7)
    assert probe_wait(0.4, rtt_s=None, typical_gap_s=0.01) == 0.4
    assert max_probe_s(0.4, 0.2) == pytest.approx(1.2)


def test_own_stalls_extend_the_wait_by_at_most_half():
    assert not lost(0.39, 0.4, 0.0) and lost(0.4, 0.4, 0.0)
    assert not lost(0.49, 0.4, 0.1) and lost(0.5, 0.4, 0.1)
    assert not lost(0.59, 0.4, 5.0) and lost(0.61, 0.4, 5.0)  # a dead peer is lost within 1.5 waits
    assert lost(0.4, 0.4, -1.0)


def test_the_reply_clock_knows_the_typical_gap():
    clock = ReplyClock(0.3, 8.0)
    assert clock.typical() is None and clock.suspect_after() is None
    for gap in (0.01, 0.02, 0.5):
        clock.observe(gap)
    assert clock.typical() == 0.02 and clock.suspect_after() == 0.3


async def test_a_peer_answering_within_the_wait_is_heard_and_a_dead_one_is_not():
    alive = LateLink(0.05)
    assert await heard_from(alive, 0.4)
    dead = LateLink(None)
    assert not await heard_from(dead, 0.2)
    assert dead.pings == 1  # one ping: the channel is reliable, a late peer answers that one


async def test_a_late_answer_counts_when_this_loop_was_stalled_meanwhile():
    """The answer comes 0.5 s after the ping, past the 0.4 s wait, but this loop was blocked for 0.3 s of
    it (a loaded machine): the stall stretches the wait, and the peer is kept. A dead peer under the same
    stall is still lost."""
    assert lost(0.5, 0.4, 0.0)  # without counting the stall, this answer would have come too late
    loop = asyncio.get_running_loop()
    late = LateLink(0.5)
    loop.call_soon(time.sleep, 0.3)
    assert await heard_from(late, 0.4)
    dead = LateLink(None)
    loop.call_soon(time.sleep, 0.3)
    assert not await heard_from(dead, 0.4)


async def test_a_slow_stepping_peer_gets_two_of_its_gaps():
    """A request whose replies come every 0.3 s: a peer answering the ping after 0.5 s is kept."""
    late = LateLink(0.5)
    assert await heard_from(late, 0.4, typical_gap_s=0.3)


def watched_clock() -> ReplyClock:
    """A request that has had replies 10 ms apart: its silence is suspect after the 0.3 s floor."""
    clock = ReplyClock(0.3, 8.0)
    for _ in range(4):
        clock.observe(0.01)
    return clock


async def test_the_ping_goes_out_halfway_through_the_silence():
    """A reply that takes 1 s from a peer whose loop answers pings 0.5 s late: pinged at 0.15 s, it answers at
    0.65 s, before the verdict at 0.3 + 0.4 s, so the reply is awaited (a ping sent when the silence became
    suspect, at 0.3 s, would have been answered only at 0.8 s: lost). A dead peer is lost."""
    loop = asyncio.get_running_loop()
    slow = LateLink(0.5)
    reply = loop.create_future()
    loop.call_later(1.0, reply.set_result, "token")
    assert await await_reply(reply, slow, watched_clock(), 0.4) == "token"
    assert slow.pings >= 1
    dead = LateLink(None)
    with pytest.raises(PeerSilent):
        await await_reply(loop.create_future(), dead, watched_clock(), 0.4)
    assert dead.pings == 1


async def test_a_reply_during_the_probe_is_taken_at_once():
    """A dead-slow ping answer does not hold back a reply that arrives while the probe waits."""
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    loop.call_later(0.4, reply.set_result, "token")
    async with asyncio.timeout(60):  # a hang guard: the probe would wait an hour for the ping's answer
        assert await await_reply(reply, LateLink(None), watched_clock(), 3600.0) == "token"


async def test_next_reply_keeps_the_rule_over_an_inbox():
    """`next_reply` (the offload's per-token wait) judges a silence as `await_reply` does: a peer whose loop
    answers pings 0.5 s late is waited for until its reply at 1 s, a dead one is lost after one ping."""
    loop = asyncio.get_running_loop()
    slow, inbox = LateLink(0.5), Inbox[str]()
    loop.call_later(1.0, inbox.put, "token")
    assert await next_reply(inbox, slow, watched_clock(), 0.4) == "token"
    assert slow.pings >= 1
    dead, silent = LateLink(None), Inbox[str]()
    with pytest.raises(PeerSilent):
        await next_reply(silent, dead, watched_clock(), 0.4)
    assert dead.pings == 1
    with pytest.raises(TimeoutError):  # the request's own timeout, before the silence is suspect
        await next_reply(Inbox[str](), LateLink(0.0), watched_clock(), 0.4, timeout_s=0.05)


async def test_replies_in_time_cost_no_task_or_timer_each():
    """Replies that come before their silence is suspect: no task and no new timer per reply (one timer for
    the request, moved on when it fires early), in order, and the clock learns their gaps."""
    loop = asyncio.get_running_loop()
    link, clock, inbox = LateLink(0.0), watched_clock(), Inbox[int]()
    tasks, timers = 0, 0
    factory = loop.get_task_factory()
    call_at = loop.call_at

    def counting_task(lp: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        nonlocal tasks
        tasks += 1
        return asyncio.Task(coro, loop=lp, **kwargs)

    def counting_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal timers
        timers += 1
        return call_at(when, callback, *args, **kwargs)

    for i in range(20):
        loop.call_later(0.002 * (i + 1), inbox.put, i)
    loop.set_task_factory(counting_task)
    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        got = [await next_reply(inbox, link, clock, 0.4) for _ in range(20)]
    finally:
        loop.set_task_factory(factory)
        del loop.call_at
    inbox.close()
    assert got == list(range(20))
    assert tasks == 0 and timers <= 2 and link.pings == 0
    assert len(clock._gaps) == clock._gaps.maxlen  # the waited replies' gaps were observed


async def test_an_inbox_keeps_an_item_that_came_as_its_getter_was_cancelled():
    inbox = Inbox[str]()
    getter = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put("token")
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    assert len(inbox) == 1 and await inbox.get() == "token"
