"""Admission control for the KV cache: a request reserves every token it may use before it starts.

A request's reservation is its prompt plus its `max_tokens`, rounded up to whole KV pages, so admitted
requests can never run the cache out of room mid-stream. Requests that do not fit wait in one bounded FIFO
queue (strict order: a large request at the head is not overtaken, so it cannot starve); a request past
`max_waiting` is refused at once (`QueueFullError`), one that waits longer than `wait_timeout_s` is ended
(`AdmissionTimeoutError`). Both carry a `retry_after_s` hint.

Pure bookkeeping: no asyncio, no clock of its own (callers pass `now`). The engine calls `submit` when a
request arrives, `admit` each turn, `release` when a request ends (finished, failed or cancelled while still
waiting) and `expire` for waits past the timeout.

    admission = Admission(AdmissionLimits(capacity=4096, page_size=16, max_active=8))
    admission.submit(seq_id, prompt_tokens + max_tokens, now=time.monotonic())
    for seq_id in admission.admit():
        ...  # start it
    admission.release(seq_id)  # when it ends
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from shoal.models.errors import ContextOverflowError, ModelError

MAX_RETRY_AFTER_S = 60


class AdmissionError(ModelError):
    """A request was not admitted; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFullError(AdmissionError):
    """The admission queue is full: the request was refused before any work."""


class AdmissionTimeoutError(AdmissionError):
    """The request waited longer than the admission timeout for room in the KV cache."""


@dataclass(frozen=True)
class AdmissionLimits:
    capacity: int
    """KV-cache tokens over all admitted requests (rounded down to whole pages)."""
    page_size: int = 1
    """Tokens per KV page: reservations are whole pages (TVM's paged cache: 16)."""
    max_active: int = 8
    """Requests admitted at once (the engine's batch slots)."""
    max_waiting: int = 32
    """Requests that may wait; one more is refused with QueueFullError."""
    wait_timeout_s: float | None = None
    """Longest wait before AdmissionTimeoutError; None waits as long as it takes."""

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError("page_size must be at least 1")
        if self.capacity < self.page_size:
            raise ValueError(
                f"capacity {self.capacity} must hold at least one page of {self.page_size} tokens"
            )
        if self.max_active < 1:
            raise ValueError("max_active must be at least 1")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        if self.wait_timeout_s is not None and not self.wait_timeout_s > 0:
            raise ValueError("wait_timeout_s must be positive (or None)")


@dataclass
class Ticket:
    """One request's reservation."""

    key: int
    tokens: int
    """Tokens reserved (whole pages)."""
    queued_at: float
    admitted_at: float | None = None

    @property
    def waited_s(self) -> float:
        return 0.0 if self.admitted_at is None else self.admitted_at - self.queued_at


class Admission:
    """The KV budget and the queue of requests waiting for room in it."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.capacity = limits.capacity // limits.page_size * limits.page_size
        self._waiting: OrderedDict[int, Ticket] = OrderedDict()
        self._active: dict[int, Ticket] = {}
        self.reserved = 0
        self.refused = 0
        """Requests refused because the queue was full."""
        self.timed_out = 0

    # --- state ------------------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return self.capacity - self.reserved

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting_tokens(self) -> int:
        return sum(t.tokens for t in self._waiting.values())

    def ticket(self, key: int) -> Ticket | None:
        return self._active.get(key) or self._waiting.get(key)

    def reservation(self, tokens: int) -> int:
        """`tokens` rounded up to whole pages."""
        page = self.limits.page_size
        return -(-tokens // page) * page

    # --- transitions ------------------------------------------------------------------------------------

    def submit(self, key: int, tokens: int, now: float, tokens_per_s: float | None = None) -> Ticket:
        """Queue a request that may use `tokens` KV tokens. Raises ContextOverflowError when it could never
        fit, QueueFullError when `max_waiting` requests wait already; nothing changes then."""
        if key in self._waiting or key in self._active:
            raise ValueError(f"request {key} was submitted already")
        if tokens < 1:
            raise ValueError("a request reserves at least one token")
        needed = self.reservation(tokens)
        if needed > self.capacity:
            raise ContextOverflowError(
                f"the request may use {tokens} tokens (prompt + max_tokens); the KV cache holds "
                f"{self.capacity}: lower max_tokens or shorten the prompt"
            )
        if len(self._waiting) >= self.limits.max_waiting:
            self.refused += 1
            raise QueueFullError(
                f"{len(self._waiting)} requests are already waiting for room in the KV cache "
                f"(the queue holds {self.limits.max_waiting}); retry later",
                self.retry_after_s(tokens_per_s),
            )
        ticket = Ticket(key=key, tokens=needed, queued_at=now)
        self._waiting[key] = ticket
        return ticket

    def admit(self, now: float) -> list[int]:
        """Admit waiting requests in FIFO order while the head fits in the free KV and a slot is free."""
        admitted = []
        while self._waiting and len(self._active) < self.limits.max_active:
            key, ticket = next(iter(self._waiting.items()))
            if ticket.tokens > self.free:
                break
            del self._waiting[key]
            ticket.admitted_at = now
            self._active[key] = ticket
            self.reserved += ticket.tokens
            admitted.append(key)
        return admitted

    def release(self, key: int) -> None:
        """The request ended (or was cancelled while waiting): free its place. Unknown keys are ignored."""
        ticket = self._active.pop(key, None)
        if ticket is not None:
            self.reserved -= ticket.tokens
        else:
            self._waiting.pop(key, None)

    def expire(self, now: float) -> list[int]:
        """Remove and return the waiting requests whose wait reached `wait_timeout_s`."""
        timeout = self.limits.wait_timeout_s
        if timeout is None:
            return []
        expired = [k for k, t in self._waiting.items() if now - t.queued_at >= timeout]
        for key in expired:
            del self._waiting[key]
        self.timed_out += len(expired)
        return expired

    def next_deadline(self) -> float | None:
        """When the oldest waiting request times out (None: nothing waits, or no timeout)."""
        timeout = self.limits.wait_timeout_s
        if timeout is None or not self._waiting:
            return None
        return next(iter(self._waiting.values())).queued_at + timeout

    def retry_after_s(self, tokens_per_s: float | None) -> int:
        """A whole-second hint for a refused request: the queued reservations plus half the admitted ones,
        at the engine's recent token rate; 1 s when the rate is unknown, at most MAX_RETRY_AFTER_S."""
        if not tokens_per_s or tokens_per_s <= 0:
            return 1
        backlog = self.waiting_tokens + self.reserved / 2
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(backlog / tokens_per_s)))
