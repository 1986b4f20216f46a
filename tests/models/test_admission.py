"""KV admission bookkeeping (models/admission.py): reserve/release, FIFO, queue full, cancel, expiry."""

from __future__ import annotations

import pytest
from shoal.models.admission import (
    Admission,
    AdmissionLimits,
    QueueFullError,
)
from shoal.models.errors import ContextOverflowError


def make(capacity: int = 100, page: int = 1, active: int = 8, waiting: int = 4,
         timeout: float | None = None) -> Admission:
    limits = AdmissionLimits(capacity=capacity, page_size=page, max_active=active, max_waiting=waiting,
                             wait_timeout_s=timeout)
    return Admission(limits)


def test_reserve_and_release_track_the_free_tokens() -> None:
    adm = make(capacity=100)
    adm.submit(1, 60, now=0.0)
    adm.submit(2, 30, now=0.0)
    assert adm.admit(now=1.0) == [1, 2]
    assert adm.reserved == 90 and adm.free == 10 and adm.active == 2
    assert adm.ticket(1) is not None and adm.ticket(1).waited_s == 1.0
    adm.release(1)
    assert adm.reserved == 30 and adm.active == 1
    adm.release(1)  # idempotent
    adm.release(99)  # unknown: ignored
    assert adm.reserved == 30


def test_reservations_are_whole_pages_and_capacity_rounds_down() -> None:
    adm = make(capacity=70, page=16)
    assert adm.capacity == 64
    adm.submit(1, 17, now=0.0)  # two pages
    adm.submit(2, 33, now=0.0)  # three pages: 32 + 48 > 64
    assert adm.admit(now=0.0) == [1]
    assert adm.reserved == 32 and adm.waiting == 1
    adm.release(1)
    assert adm.admit(now=0.0) == [2] and adm.reserved == 48


def test_fifo_a_large_head_is_not_overtaken() -> None:
    adm = make(capacity=100)
    adm.submit(1, 80, now=0.0)
    assert adm.admit(now=0.0) == [1]
    adm.submit(2, 50, now=1.0)  # does not fit yet
    adm.submit(3, 10, now=2.0)  # would fit, but waits behind 2
    assert adm.admit(now=3.0) == []
    adm.release(1)
    assert adm.admit(now=4.0) == [2, 3]


def test_batch_slots_bound_admission() -> None:
    adm = make(capacity=1000, active=2)
    for key in range(3):
        adm.submit(key, 10, now=0.0)
    assert adm.admit(now=0.0) == [0, 1] and adm.waiting == 1
    adm.release(0)
    assert adm.admit(now=0.0) == [2]


def test_queue_full_refuses_with_a_hint_and_changes_nothing() -> None:
    adm = make(capacity=100, waiting=2)
    adm.submit(1, 100, now=0.0)
    adm.admit(now=0.0)
    adm.submit(2, 50, now=0.0)
    adm.submit(3, 50, now=0.0)
    with pytest.raises(QueueFullError, match=r"2 requests are already waiting .* holds 2") as info:
        adm.submit(4, 10, now=0.0, tokens_per_s=20.0)
    assert info.value.retry_after_s == 8  # (50 + 50 waiting + 100 / 2 admitted) / 20 tok/s, rounded up
    assert adm.waiting == 2 and adm.refused == 1 and adm.ticket(4) is None
    with pytest.raises(QueueFullError) as info:
        adm.submit(4, 10, now=0.0)
    assert info.value.retry_after_s == 1  # rate unknown


def test_a_request_larger_than_the_cache_is_refused_at_once() -> None:
    adm = make(capacity=64, page=16)
    with pytest.raises(ContextOverflowError, match=r"may use 65 tokens .* holds 64"):
        adm.submit(1, 65, now=0.0)
    assert adm.waiting == 0
    with pytest.raises(ValueError, match="submitted already"):
        adm.submit(2, 1, now=0.0)
        adm.submit(2, 1, now=0.0)


def test_cancelling_a_waiting_request_frees_its_place() -> None:
    adm = make(capacity=100, waiting=2)
    adm.submit(1, 100, now=0.0)
    adm.admit(now=0.0)
    adm.submit(2, 90, now=0.0)
    adm.submit(3, 10, now=0.0)
    adm.release(2)  # cancelled while waiting: its queue place and its claim go
    assert adm.waiting == 1 and adm.reserved == 100
    adm.submit(4, 10, now=0.0)  # the queue has room again
    adm.release(1)
    assert adm.admit(now=0.0) == [3, 4]


def test_a_failed_request_releases_its_reservation() -> None:
    adm = make(capacity=100)
    adm.submit(1, 100, now=0.0)
    adm.submit(2, 40, now=0.0)
    assert adm.admit(now=0.0) == [1]
    adm.release(1)  # the engine ends a failing sequence with release, as any other end
    assert adm.admit(now=0.0) == [2] and adm.reserved == 40


def test_waits_past_the_timeout_expire_in_order() -> None:
    adm = make(capacity=100, timeout=5.0)
    adm.submit(1, 100, now=0.0)
    adm.admit(now=0.0)
    adm.submit(2, 10, now=1.0)
    adm.submit(3, 10, now=3.0)
    assert adm.next_deadline() == 6.0
    assert adm.expire(now=5.9) == []
    assert adm.expire(now=6.0) == [2]
    assert adm.next_deadline() == 8.0 and adm.timed_out == 1
    assert adm.expire(now=9.0) == [3] and adm.next_deadline() is None
    assert make(timeout=None).expire(now=1e9) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 8, "page_size": 16}, "at least one page"),
        ({"capacity": 64, "max_active": 0}, "max_active"),
        ({"capacity": 64, "max_waiting": 0}, "max_waiting"),
        ({"capacity": 64, "wait_timeout_s": 0.0}, "wait_timeout_s"),
        ({"capacity": 64, "page_size": 0}, "page_size"),
    ],
)
def test_limits_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdmissionLimits(**kwargs)
