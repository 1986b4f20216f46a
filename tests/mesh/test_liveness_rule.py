"""The loss rule of `split.liveness`: a pinged peer is lost only after the probe's wait (the probe timeout, at
least 4 RTTs and 2 typical reply gaps) plus this node's own loop stalls (up to the wait again), so a peer
answering late on a loaded machine is kept while a dead one is still declared lost.

The peer here is a link whose answer to a ping arrives after a set time, or never (the injected fault); the
stall is a blocking sleep on this test's own event loop, as a descheduled process would see."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from shoal.mesh.split.liveness import ReplyClock, heard_from, lost, max_probe_s, probe_wait


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
    assert max_probe_s(0.4, 0.2) == pytest.approx(1.6)


def test_own_stalls_extend_the_wait_at_most_once_more():
    assert not lost(0.39, 0.4, 0.0) and lost(0.4, 0.4, 0.0)
    assert not lost(0.6, 0.4, 0.3) and lost(0.7, 0.4, 0.3)
    assert not lost(0.79, 0.4, 5.0) and lost(0.8, 0.4, 5.0)  # a dead peer is lost within twice the wait
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
    """The answer comes 0.55 s after the ping, past the 0.4 s wait, but this loop was blocked for 0.35 s of
    it (a loaded machine): the stall stretches the wait, and the peer is kept. A dead peer under the same
    stall is still lost."""
    assert lost(0.55, 0.4, 0.0)  # without counting the stall, this answer would have come too late
    loop = asyncio.get_running_loop()
    late = LateLink(0.55)
    loop.call_soon(time.sleep, 0.35)
    assert await heard_from(late, 0.4)
    dead = LateLink(None)
    loop.call_soon(time.sleep, 0.35)
    assert not await heard_from(dead, 0.4)


async def test_a_slow_stepping_peer_gets_two_of_its_gaps():
    """A request whose replies come every 0.3 s: a peer answering the ping after 0.5 s is kept."""
    late = LateLink(0.5)
    assert await heard_from(late, 0.4, typical_gap_s=0.3)
