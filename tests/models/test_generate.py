"""The Engine on the NumPy reference stage: finish reasons, stop strings, cancellation, batching, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from shoal.models.errors import ContextOverflowError
from shoal.models.generate import Engine, EngineStoppedError, TokenEvent
from shoal.models.reference import ReferenceStage
from shoal.models.sampling import SamplingParams
from shoal.models.span import LayerSpan

from tests.models.shared_model import chat_ids, dequantized, gguf_model, reference_stage, tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=16)
PARIS = "What is the capital of France?"


def _whole() -> list[ReferenceStage]:
    return [reference_stage(0, 30)]


async def _collect(engine: Engine, ids: list[int], params: SamplingParams) -> list[TokenEvent]:
    return [event async for event in engine.stream(ids, params)]


async def _wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Poll a condition the engine's executor thread makes true."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 (state changes in another thread; no event to await)
            await asyncio.sleep(0.01)


async def test_eos_finishes_with_stop() -> None:
    async with Engine(_whole(), tokenizer()) as engine:
        events = await _collect(engine, chat_ids(PARIS), GREEDY)
    text = "".join(e.text for e in events)
    assert text == "The capital of France is Paris."
    assert events[-1].finish_reason == "stop" and events[-1].token_id == tokenizer().eos_token_id
    assert all(e.finish_reason is None for e in events[:-1])
    assert [e.completion_tokens for e in events] == list(range(1, len(events) + 1))
    assert events[-1].prompt_tokens == len(chat_ids(PARIS))
    assert engine.stats.finished == 1 and engine.stats.prefill_tokens == len(chat_ids(PARIS))


async def test_max_tokens_finishes_with_length() -> None:
    async with Engine(_whole(), tokenizer()) as engine:
        result = await engine.generate_text(chat_ids(PARIS), SamplingParams(temperature=0, max_tokens=3))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 3 and len(result.token_ids) == 3
    assert result.text == "The capital of"


async def test_stop_string_split_across_tokens() -> None:
    """" France" and " is" are separate tokens; the stop string "ce is" spans them and is never emitted."""
    async with Engine(_whole(), tokenizer()) as engine:
        events = await _collect(engine, chat_ids(PARIS), SamplingParams(temperature=0, max_tokens=16,
                                                                          stop=["xyz", "ce is"]))
        # " France" emits " Fran" and holds "ce" back; " is" completes the stop string
        assert [e.text for e in events] == ["The", " capital", " of", " Fran", ""]
        assert events[-1].finish_reason == "stop"
        # a stop string that never shows up changes nothing
        result = await engine.generate_text(chat_ids(PARIS), SamplingParams(temperature=0, max_tokens=16,
                                                                            stop=["Paris!"]))
        assert result.text == "The capital of France is Paris."
        first_token = await engine.generate_text(chat_ids(PARIS), SamplingParams(temperature=0, stop="The"))
        assert first_token.text == "" and first_token.completion_tokens == 1


async def test_cancellation_frees_kv_cache() -> None:
    stages = [reference_stage(0, 13), reference_stage(13, 30)]
    before = [set(st.sequence_ids()) for st in stages]
    async with Engine(stages, tokenizer()) as engine:
        ids = chat_ids("Tell me a long story about a dragon.")
        stream = engine.stream(ids, SamplingParams(max_tokens=200))
        got = [await anext(stream), await anext(stream)]
        assert all(e.finish_reason is None for e in got)
        assert all(len(st.sequence_ids()) == len(b) + 1 for st, b in zip(stages, before, strict=True))
        await stream.aclose()
        await _wait_for(lambda: [set(st.sequence_ids()) for st in stages] == before)
        assert engine.active_count == 0
        # finished requests are freed too
        await engine.generate_text(chat_ids(PARIS), SamplingParams(temperature=0, max_tokens=2))
        await _wait_for(lambda: [set(st.sequence_ids()) for st in stages] == before)


async def test_concurrent_streams_are_batched_and_match_solo() -> None:
    prompts = [chat_ids(q) for q in (PARIS, "Say hello.", "Name a color.", "What is 2+2?")]
    params = SamplingParams(temperature=0, max_tokens=6)
    async with Engine(_whole(), tokenizer()) as engine:
        solo = [await engine.generate_text(ids, params) for ids in prompts]
        assert engine.stats.max_decode_batch == 1
        together = await asyncio.gather(*(engine.generate_text(ids, params) for ids in prompts))
        assert engine.stats.max_decode_batch >= 3
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]
    assert [r.text for r in together] == [r.text for r in solo]


async def test_chunked_prefill_matches() -> None:
    ids = chat_ids(PARIS)
    async with Engine(_whole(), tokenizer(), prefill_chunk=7) as engine:
        result = await engine.generate_text(ids, GREEDY)
        assert engine.stats.prefill_chunks == -(-len(ids) // 7)
    assert result.text == "The capital of France is Paris."


async def test_fifo_admission_and_queue_depth() -> None:
    async with Engine(_whole(), tokenizer(), max_batch=1) as engine:
        first = engine.stream(chat_ids(PARIS), SamplingParams(temperature=0, max_tokens=4))
        second = engine.stream(chat_ids("Say hello."), SamplingParams(temperature=0, max_tokens=2))
        assert engine.queue_depth == 2
        await anext(first)
        assert engine.active_count == 1 and engine.queue_depth == 1
        rest_first = [e async for e in first]
        assert rest_first[-1].finish_reason == "length"
        rest_second = [e async for e in second]
        assert rest_second[-1].finish_reason == "length" and len(rest_second) == 2
        assert engine.queue_depth == 0


async def test_errors_raised_before_any_work() -> None:
    engine = Engine(_whole(), tokenizer())
    with pytest.raises(EngineStoppedError, match="not running; call start"):
        engine.stream([1, 2], GREEDY)
    async with engine:
        expected = (r"prompt \(2 tokens\) \+ max_tokens \(9000\) exceeds the context of 8192 tokens; "
                    r"lower max_tokens to at most 8190")
        with pytest.raises(ContextOverflowError, match=expected):
            engine.stream([1, 2], SamplingParams(max_tokens=9000))
        with pytest.raises(ValueError, match="at least one token"):
            engine.stream([], GREEDY)
        with pytest.raises(ValueError, match=r"prompt token ids must be in 0..49151"):
            engine.stream([49152], GREEDY)
        assert engine.queue_depth == 0 and engine.stats.prefill_chunks == 0
    with pytest.raises(ValueError, match="must tile the layers"):
        Engine([reference_stage(13, 30)], tokenizer())
    with pytest.raises(ValueError, match="end at layer 13, the model has 30"):
        Engine([reference_stage(0, 13)], tokenizer())


async def test_stop_ends_live_streams() -> None:
    before = set(_whole()[0].sequence_ids())
    engine = Engine(_whole(), tokenizer())
    await engine.start()
    stream = engine.stream(chat_ids(PARIS), SamplingParams(max_tokens=100))
    await anext(stream)
    await engine.stop()
    await engine.stop()  # idempotent
    with pytest.raises(EngineStoppedError, match="stopped before the request finished"):
        async for _ in stream:
            pass
    assert engine.active_count == 0 and not engine.running
    assert set(_whole()[0].sequence_ids()) == before


async def test_stage_failure_ends_that_stream_and_the_engine_goes_on() -> None:
    """A stage that loses a sequence (as a restarted remote stage would) fails that request with the stage's
    own error; the engine keeps serving."""
    stage = _whole()[0]
    before = set(stage.sequence_ids())
    async with Engine([stage], tokenizer()) as engine:
        stream = engine.stream(chat_ids(PARIS), SamplingParams(temperature=0, max_tokens=50))
        await anext(stream)
        (lost,) = set(stage.sequence_ids()) - before
        stage.remove_sequence(lost)
        with pytest.raises(ValueError, match=f"unknown sequence {lost}; call add_sequence first"):
            async for _ in stream:
                pass
        result = await engine.generate_text(chat_ids(PARIS), GREEDY)
        assert result.text == "The capital of France is Paris."
    assert set(stage.sequence_ids()) == before


class ArgmaxStage(ReferenceStage):
    """A last stage that also takes each row's argmax itself (as a split's remote last stage does)."""

    calls = 0

    def decode_argmax(self, seq_ids: list[int], inputs: object) -> list[int]:
        self.calls += 1
        return [int(row.argmax()) for row in self.decode(seq_ids, inputs)]  # type: ignore[arg-type]


async def test_plain_greedy_steps_let_the_last_stage_take_the_argmax() -> None:
    last = ArgmaxStage(gguf_model(), LayerSpan(0, 30), load=dequantized)
    batch = [chat_ids(PARIS), chat_ids("Name a colour.")]
    async with Engine(_whole(), tokenizer()) as engine:
        want = [await engine.generate_text(ids, GREEDY) for ids in batch]
        penalised = SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3)
        want_penalised = await engine.generate_text(batch[0], penalised)
    async with Engine([last], tokenizer()) as engine:
        got = await asyncio.gather(*(engine.generate_text(ids, GREEDY) for ids in batch))
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        steps = engine.stats.decode_steps
        assert last.calls == steps > 0  # every decode step of plain greedy requests
        assert (await engine.generate_text(batch[0], penalised)).token_ids == want_penalised.token_ids
        assert last.calls == steps  # penalties need the whole row: the sampler took it
