"""When the next record of a direct tensor link should arrive, and a wait that polls around that moment.

Why: during a split's decode the two ends of a link answer each other at a steady beat (the other stage's
compute, a few ms). A thread that blocks in the kernel for the next record lets its core halt, and waking a
halted core cost ~50–340 µs a hop on the VMs measured (docs/split.md, *Polling around the beat*) — two to
four hops a token. A thread that is already running when the record lands takes it at once.

So the waiter sleeps until shortly before the record is due (the 10th percentile of the last gaps, less a
third of the spin budget), then polls the sockets without sleeping until it is readable or the spin budget
(`[split] link_spin_us`) is spent, and only then blocks as before. The poll never spins longer than the
budget per wait, and not at all until a few gaps were seen (a link at rest, between requests, or with the
budget 0: off). The poll yields the core on every turn, so it takes time only from a core nobody else
wants (two stage nodes on one core: the one computing keeps running).
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections import deque
from collections.abc import Sequence

HISTORY = 16
"""Gaps kept per link end."""
MIN_GAPS = 4
"""Gaps needed before the waiter polls."""
MAX_GAP_S = 0.1
"""Longer gaps (a pause between requests, a prefill) are not a beat and are not kept."""
MAX_SELECT_FD = 1023
"""`select()` takes descriptors below FD_SETSIZE only; with a larger one the waiter just blocks."""


class Arrivals:
    """The recent gaps between one link end's send (or answer) and the next record it received."""

    def __init__(self, spin_s: float) -> None:
        if not 0 <= spin_s <= 0.01:
            raise ValueError(f"spin budget must be in [0, 10 ms], got {spin_s}")
        self.spin_s = spin_s
        self._gaps: deque[float] = deque(maxlen=HISTORY)

    def observe(self, gap_s: float) -> None:
        if self.spin_s > 0 and 0 < gap_s <= MAX_GAP_S:  # off (the default): no bookkeeping a token
            self._gaps.append(gap_s)

    def window(self) -> tuple[float, float] | None:
        """(start, stop) in seconds after the send: when to stop sleeping and start polling, and when to
        give up polling; None when there is nothing to predict (budget 0, too few gaps)."""
        if self.spin_s <= 0 or len(self._gaps) < MIN_GAPS:
            return None
        early = sorted(self._gaps)[len(self._gaps) // 10]
        start = max(0.0, early - self.spin_s / 3)
        return start, start + self.spin_s


def wait_readable(socks: Sequence[socket.socket], since: float, window: tuple[float, float]) -> bool:
    """Sleep (woken early by a readable socket) until `since + window[0]` on `time.perf_counter()`, then poll
    without sleeping until one of `socks` is readable or `since + window[1]` passed. True when one is
    readable; False when the window passed, or a socket cannot be polled (closed, or past `select`'s range):
    the caller then blocks as it would have."""
    try:
        if any(s.fileno() > MAX_SELECT_FD or s.fileno() < 0 for s in socks):
            return False
        sleep = since + window[0] - time.perf_counter()
        if sleep > 0 and select.select(socks, (), (), sleep)[0]:
            return True
        deadline = since + window[1]
        while time.perf_counter() < deadline:
            if select.select(socks, (), (), 0)[0]:
                return True
            os.sched_yield()  # a thread that shares this core (another stage's compute) runs first
    except (OSError, ValueError):  # a socket closed under the wait: the blocking read reports it
        return False
    return False
