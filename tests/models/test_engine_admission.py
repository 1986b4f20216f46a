"""The Engine's KV admission and fault isolation on the NumPy reference stage: requests that do not fit wait
their turn and all finish; a full queue refuses at once; a cancelled or timed-out wait frees its place; a
stage fault pinned on one sequence ends only that request."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from shoal.models.admission import AdmissionTimeoutError, QueueFullError
from shoal.models.errors import ContextOverflowError
from shoal.models.generate import Engine
from shoal.models.reference import ReferenceStage
from shoal.models.sampling import SamplingParams
from shoal.models.span import LayerSpan

from tests.models.shared_model import chat_ids, dequantized, gguf_model, reference_stage, tokenizer

PARIS = "What is the capital of France?"


def greedy(max_tokens: int | None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


class FaultyStage(ReferenceStage):
    """A whole-model stage whose decode raises, before touching any cache, when a poisoned sequence is in the
    batch (as a stage that cannot serve one sequence would)."""

    poison: set[int]

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        if self.poison & set(seq_ids):
            raise RuntimeError(f"injected fault for sequences {sorted(self.poison & set(seq_ids))}")
        return super().decode(seq_ids, inputs)


async def test_a_stage_fault_on_one_sequence_ends_only_that_request() -> None:
    stage = FaultyStage(gguf_model(), LayerSpan(0, 30), load=dequantized)
    stage.poison = set()
    prompts = [chat_ids(PARIS), chat_ids("Name a colour."), chat_ids("Say hello.")]
    async with Engine([reference_stage(0, 30)], tokenizer()) as engine:
        want = [await engine.generate_text(ids, greedy(6)) for ids in prompts]
    async with Engine([stage], tokenizer()) as engine:
        stage.poison = {1}  # the engine numbers sequences from 0 in arrival order: the second request
        results = await asyncio.gather(*(engine.generate_text(ids, greedy(6)) for ids in prompts),
                                       return_exceptions=True)
        assert isinstance(results[1], RuntimeError) and "injected fault for sequences [1]" in str(results[1])
        for got, expected in zip([results[0], results[2]], [want[0], want[2]], strict=True):
            assert not isinstance(got, BaseException)
            assert got.token_ids == expected.token_ids  # retried alone, with caches intact
        assert engine.stats.retried_alone >= 2
        assert engine.kv_reserved == 0 and engine.active_count == 0
    assert stage.sequence_ids() == []


async def test_requests_beyond_the_kv_budget_wait_and_all_finish() -> None:
    prompt = chat_ids(PARIS)
    budget = len(prompt) + 8  # one request at a time
    async with Engine([reference_stage(0, 30)], tokenizer(), kv_tokens=budget) as engine:
        assert engine.max_context == budget
        streams = [engine.stream(prompt, greedy(8)) for _ in range(3)]
        assert engine.queue_depth == 3
        results = [[e async for e in s] for s in streams]
        assert all(r[-1].finish_reason in ("stop", "length") for r in results)
        assert [e.token_id for e in results[0]] == [e.token_id for e in results[2]]
        assert engine.stats.admitted == 3 and engine.stats.max_decode_batch == 1
        assert results[2][0].queued_s > results[0][0].queued_s  # it waited for the others' room
        assert engine.kv_reserved == 0 and engine.queue_depth == 0
        with pytest.raises(ContextOverflowError, match=f"exceeds the context of {budget} tokens"):
            engine.stream(prompt, greedy(9))


async def test_a_full_queue_refuses_at_once_and_a_cancelled_wait_frees_its_place() -> None:
    prompt = chat_ids(PARIS)
    async with Engine([reference_stage(0, 30)], tokenizer(), kv_tokens=len(prompt) + 8,
                      max_waiting=2) as engine:
        first = engine.stream(prompt, greedy(8))
        await anext(first)  # admitted and running
        second = engine.stream(prompt, greedy(2))
        third = engine.stream(prompt, greedy(2))
        with pytest.raises(QueueFullError, match="2 requests are already waiting") as info:
            engine.stream(prompt, greedy(2))
        assert info.value.retry_after_s >= 1 and engine.stats.refused == 1
        await second.aclose()  # cancelled while waiting
        fourth = engine.stream(prompt, greedy(2))  # its place is free again
        rest = [e async for e in first]
        assert rest[-1].finish_reason is not None
        assert len([e async for e in third]) >= 1 and len([e async for e in fourth]) >= 1
        assert engine.stats.admitted == 3 and engine.kv_reserved == 0


async def test_a_wait_past_the_timeout_ends_with_retry_after() -> None:
    prompt = chat_ids(PARIS)
    async with Engine([reference_stage(0, 30)], tokenizer(), kv_tokens=len(prompt) + 40,
                      wait_timeout_s=0.2) as engine:
        first = engine.stream(prompt, SamplingParams(temperature=0, max_tokens=40, stop=["zzzz"]))
        await anext(first)
        second = engine.stream(prompt, greedy(2))
        with pytest.raises(AdmissionTimeoutError, match=r"waited 0\.2 s") as info:
            await anext(second)
        assert info.value.retry_after_s >= 1 and engine.stats.timed_out == 1
        await first.aclose()
        assert (await engine.generate_text(prompt, greedy(2))).completion_tokens == 2


async def test_an_omitted_max_tokens_is_capped_by_the_default() -> None:
    async with Engine([reference_stage(0, 30)], tokenizer(), default_max_tokens=3) as engine:
        result = await engine.generate_text(chat_ids("Write a long story."), greedy(None))
    assert result.finish_reason == "length" and result.completion_tokens == 3
