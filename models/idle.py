"""Work a decode step may do while it waits on another device: the engine's deferred delivery of the last
step's tokens.

Why: in a split the origin's engine thread runs its own layers, sends their output to a peer and waits for
the next token while the peer computes (milliseconds); its core has nothing else to do then. Delivering the
previous step's tokens — posting them to the event loop, which wakes and streams them to the clients — costs
that core Python time, and done between two steps it delays the next one (on a one-core device the loop's
thread takes the core from the step's own compute). Done while the step waits on the peer, it is free.

So the engine `defer`s a step's delivery when its chain waits on peers (`Stage.waits_on_peers`), a stage
about to block on a peer calls `waiting()` (which runs it), and the engine `flush`es after the next step (a
step that failed before it waited, or never waited, still delivers). Per thread: only the engine's own
thread defers, and only its own stage calls run the deferred work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

_deferred = threading.local()


def defer(work: Callable[[], None]) -> None:
    """Run `work` at this thread's next `waiting()` or `flush()`; work deferred before and not yet run runs
    now (deliveries stay in order)."""
    flush()
    _deferred.work = work


def waiting() -> None:
    """This thread is about to block on another device: run what it deferred (at most once). Never raises:
    a failed delivery is logged, and the stage call goes on."""
    work = getattr(_deferred, "work", None)
    if work is None:
        return
    _deferred.work = None
    try:
        work()
    except Exception:  # the deferred work's failure is not the stage call's
        logger.exception("deferred work failed")


flush = waiting
"""After a step: run what was deferred if no stage of the step waited (or it failed before it did)."""
