"""What a direct tensor link's hop costs with each end asleep, against polling around the beat
(`[split] link_spin_us`, mesh/split/arrival.py) — on this device, without models or nodes.

    python bench/link_wake.py [--compute-ms 3] [--calls 400] [--rounds 3] [--spins 0,400,1000]

Two processes on a socket pair, pinned to two cores where there are two: each "computes" (a busy loop of
`--compute-ms`) and then sends one byte; the other waits for it — blocking (`spin 0`), or asleep until just
before it is due and then polling (`arrival.wait_readable`, the budget in µs). Prints the median round trip
less the two computes per setting and round, and the median of the per-round ratios to blocking: how much of
each decode step of a 2-stage split the wake-ups cost here, and what the poll takes off.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shoal.mesh.split.arrival import Arrivals, wait_readable


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


CORES = sorted(os.sched_getaffinity(0))
"""The cores this process may use, read once (a pinned parent's children inherit its one core)."""


def pin(end: int) -> None:
    """Put the origin (0) and the far end (1) on two different cores, where there are two."""
    if len(CORES) >= 2:
        os.sched_setaffinity(0, {CORES[end]})


def stage(sock: socket.socket, spin_s: float, compute_s: float, calls: int) -> None:
    """The far end: wait for a request, compute, answer."""
    arrivals, answered = Arrivals(spin_s), time.perf_counter()
    for _ in range(calls):
        window = arrivals.window()
        if window is not None:
            wait_readable([sock], answered, window)
        sock.recv(64)
        arrivals.observe(time.perf_counter() - answered)
        busy(compute_s)
        sock.send(b"y")
        answered = time.perf_counter()


def hop_cost(spin_s: float, compute_s: float, calls: int) -> float:
    """Median µs of a round trip beyond the far end's compute (the first tenth left out: the beat is
    being learnt)."""
    origin, far = socket.socketpair()
    child = os.fork()
    if child == 0:
        origin.close()
        pin(1)
        stage(far, spin_s, compute_s, calls)
        os._exit(0)
    far.close()
    pin(0)
    arrivals, extra = Arrivals(spin_s), []
    for _ in range(calls):
        busy(compute_s)  # the origin's own layers
        sent = time.perf_counter()
        origin.send(b"x")
        window = arrivals.window()
        if window is not None:
            wait_readable([origin], sent, window)
        origin.recv(64)
        took = time.perf_counter() - sent
        arrivals.observe(took)
        extra.append(took - compute_s)
    os.waitpid(child, 0)
    origin.close()
    return statistics.median(extra[calls // 10:]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compute-ms", type=float, default=3.0)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spins", default="0,400,1000", help="poll budgets in µs (0: block)")
    args = parser.parse_args()
    spins = [int(s) for s in args.spins.split(",")]
    if 0 not in spins:
        spins.insert(0, 0)
    results: dict[int, list[float]] = {s: [] for s in spins}
    for r in range(args.rounds):
        order = spins if r % 2 == 0 else spins[::-1]
        for spin in order:
            results[spin].append(hop_cost(spin / 1e6, args.compute_ms / 1e3, args.calls))
    print(f"\nround trip beyond the compute, µs ({args.calls} calls of {args.compute_ms} ms each way, "
          f"{args.rounds} rounds, settings alternated)")
    print(f"{'link_spin_us':>12} {'median µs':>10} {'per round':>24} {'× blocking':>11}")
    for spin in spins:
        ratios = [v / b for v, b in zip(results[spin], results[0], strict=True)]
        rounds = ", ".join(f"{v:.0f}" for v in results[spin])
        print(f"{spin:>12} {statistics.median(results[spin]):>10.0f} {rounds:>24} "
              f"{statistics.median(ratios):>10.2f}×")


if __name__ == "__main__":
    main()
