"""The poll around a direct link record's due time (mesh/split/arrival.py): when a window exists and where it
lies, and that the wait reports a record that is there, one that lands while it sleeps, none when the window
passes, and a closed socket — never hanging. (How much it saves is measured by bench/split.py, not here.)"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from shoal.mesh.split.arrival import MAX_GAP_S, MIN_GAPS, Arrivals, wait_readable


def test_no_window_until_a_beat_is_seen_or_when_off() -> None:
    arrivals = Arrivals(400e-6)
    for _ in range(MIN_GAPS - 1):
        arrivals.observe(0.004)
        assert arrivals.window() is None
    arrivals.observe(MAX_GAP_S * 2)  # a pause between requests is not a beat
    arrivals.observe(0.0)
    assert arrivals.window() is None
    arrivals.observe(0.004)
    start, stop = arrivals.window() or (0.0, 0.0)
    assert start == pytest.approx(0.004 - 400e-6 / 3) and stop == pytest.approx(start + 400e-6)
    off = Arrivals(0.0)
    for _ in range(10):
        off.observe(0.004)
    assert off.window() is None


def test_the_window_opens_before_the_early_gaps() -> None:
    arrivals = Arrivals(300e-6)
    for gap in [0.005] * 9 + [0.001]:  # one early outlier of ten sets the start
        arrivals.observe(gap)
    start, _ = arrivals.window() or (0.0, 0.0)
    assert start == pytest.approx(0.005 - 100e-6)
    for _ in range(20):
        arrivals.observe(0.002)
    assert (arrivals.window() or (0.0, 0.0))[0] == pytest.approx(0.002 - 100e-6)  # old gaps age out


@pytest.mark.parametrize("spin", [-1e-6, 0.011, float("nan")])
def test_the_spin_budget_is_bounded(spin: float) -> None:
    with pytest.raises(ValueError):
        Arrivals(spin)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_record_already_there_is_reported(pair) -> None:
    a, b = pair
    b.sendall(b"x")
    assert wait_readable([a], time.perf_counter(), (0.5, 0.5005))


def test_a_record_landing_during_the_sleep_ends_it(pair) -> None:
    a, b = pair
    threading.Timer(0.05, b.sendall, (b"x",)).start()
    assert wait_readable([a], time.perf_counter(), (30.0, 30.0005))  # a hang here fails by the suite timeout


def test_an_empty_window_reports_nothing(pair) -> None:
    a, _ = pair
    assert not wait_readable([a], time.perf_counter(), (0.0, 0.001))
    assert not wait_readable([a], time.perf_counter() - 1.0, (0.0, 0.5))  # the window passed already


def test_a_closed_socket_is_left_to_the_blocking_read(pair) -> None:
    a, _ = pair
    a.close()
    assert not wait_readable([a], time.perf_counter(), (0.0, 0.001))
