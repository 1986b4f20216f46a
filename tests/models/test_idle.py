"""Deferred delivery (models/idle.py): what the engine defers runs once, in order, while a step waits on a
peer — and an engine whose chain waits on peers streams the same tokens as one that does not."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from shoal.models import idle
from shoal.models.generate import Engine
from shoal.models.reference import ReferenceStage
from shoal.models.sampling import SamplingParams
from shoal.models.span import LayerSpan

from tests.models.shared_model import chat_ids, dequantized, gguf_model, reference_stage, tokenizer


def test_deferred_work_runs_once_at_the_wait_or_the_flush() -> None:
    ran: list[str] = []
    idle.defer(lambda: ran.append("first"))
    assert ran == []
    idle.waiting()
    idle.waiting()
    idle.flush()
    assert ran == ["first"]
    idle.defer(lambda: ran.append("second"))
    idle.defer(lambda: ran.append("third"))  # deferring again delivers what was pending first
    assert ran == ["first", "second"]
    idle.flush()
    assert ran == ["first", "second", "third"]


def test_deferred_work_is_per_thread() -> None:
    ran: list[str] = []
    idle.defer(lambda: ran.append("here"))
    other = threading.Thread(target=idle.waiting)
    other.start()
    other.join()
    assert ran == []  # another thread's wait does not run this thread's work
    idle.flush()
    assert ran == ["here"]


def test_a_failing_delivery_never_fails_the_wait(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("loop closed")

    idle.defer(broken)
    idle.waiting()  # does not raise
    assert "deferred work failed" in caplog.text
    idle.flush()  # nothing left


class PeerWaitingStage(ReferenceStage):
    """A last stage that "waits on a peer" in every decode step (as a split's remote stage does), noting
    whether the engine had deferred work for it at that moment."""

    waits_on_peers = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.had_work: list[bool] = []

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        out = super().decode(seq_ids, inputs)  # this stage's compute, then the wait on the "peer"
        self.had_work.append(getattr(idle._deferred, "work", None) is not None)
        idle.waiting()
        return out


async def test_an_engine_waiting_on_peers_delivers_during_the_wait_and_streams_the_same_tokens() -> None:
    params = SamplingParams(temperature=0, max_tokens=12, stop=["Paris"])
    ids = chat_ids("What is the capital of France?")
    async with Engine([reference_stage(0, 30)], tokenizer()) as engine:
        want = [(e.text, e.finish_reason) async for e in engine.stream(ids, params)]
    waiting = PeerWaitingStage(gguf_model(), LayerSpan(0, 30), load=dequantized)
    async with Engine([waiting], tokenizer()) as engine:
        got = [(e.text, e.finish_reason) async for e in engine.stream(ids, params)]
        # two at once: the events of each stay in order
        pair = await asyncio.gather(*(engine.generate_text(ids, params) for _ in range(2)))
    assert got == want
    assert [p.text for p in pair] == ["".join(t for t, _ in want)] * 2
    steps = waiting.had_work[: len(want) - 1]
    assert len(steps) >= 2 and steps[0] is False and all(steps[1:])  # step n+1 waited with step n's delivery
