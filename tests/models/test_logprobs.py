"""Logprobs (pure function, Sampler, Engine events) and sampling defaults from GGUF `general.sampling.*`."""

from __future__ import annotations

import numpy as np
import pytest
from shoal.models.generate import Engine
from shoal.models.requests import Request, next_event
from shoal.models.sampling import (
    MAX_TOP_LOGPROBS,
    Sampler,
    SamplingParams,
    defaults_from_gguf,
    token_logprobs,
)

from tests.models.shared_model import chat_ids, reference_stage, tokenizer


def test_token_logprobs_are_a_log_softmax_with_sorted_top_k() -> None:
    logits = np.array([1.0, 3.0, 2.0, 3.0, -5.0], dtype=np.float32)
    chosen, top = token_logprobs(logits, 2, 3)
    probs = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum()
    assert chosen == pytest.approx(float(np.log(probs[2])))
    assert [i for i, _ in top] == [1, 3, 2]  # ties keep the lower id first
    assert [lp for _, lp in top] == pytest.approx([np.log(probs[1]), np.log(probs[3]), np.log(probs[2])])
    assert token_logprobs(logits, 4, 0)[1] == []
    assert len(token_logprobs(logits, 0, 99)[1]) == 5


def test_logprobs_parameter_is_checked_and_turns_off_plain_greedy() -> None:
    assert SamplingParams(temperature=0).plain_greedy
    assert not SamplingParams(temperature=0, logprobs=0).plain_greedy
    for bad in (-1, MAX_TOP_LOGPROBS + 1, 1.5, True):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=bad)  # type: ignore[arg-type]


def test_sampler_records_the_chosen_tokens_logprob() -> None:
    sampler = Sampler(SamplingParams(temperature=0, logprobs=2))
    token = sampler.next_token(np.array([0.0, 5.0, 1.0], dtype=np.float32))
    assert token == 1
    assert sampler.last_logprobs is not None
    chosen, top = sampler.last_logprobs
    assert top[0] == (1, pytest.approx(chosen)) and top[1][0] == 2
    assert Sampler(SamplingParams()).last_logprobs is None


def test_defaults_from_gguf_keep_valid_keys_only() -> None:
    meta = {"general.sampling.temp": 0.6, "general.sampling.top_k": 20, "general.sampling.top_p": 0.95,
            "general.sampling.min_p": 7.0, "general.sampling.penalty_repeat": True, "general.name": "x"}
    assert defaults_from_gguf(meta) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert defaults_from_gguf({}) == {}


async def test_engine_events_carry_logprobs() -> None:
    tok = tokenizer()
    async with Engine([reference_stage(0, 30)], tok) as engine:
        ids = chat_ids("What is the capital of France?")
        asked = SamplingParams(temperature=0, max_tokens=3, logprobs=4)
        events = [e async for e in engine.stream(ids, asked)]
        plain = [e async for e in engine.stream(ids, SamplingParams(temperature=0, max_tokens=3))]
    assert [e.token_id for e in events] == [e.token_id for e in plain]  # logprobs do not change the tokens
    for event in events:
        assert event.logprobs is not None
        chosen, top = event.logprobs.chosen, event.logprobs.top
        assert chosen.token_id == event.token_id and chosen.logprob <= 0.0
        assert chosen.bytes == tok.token_bytes(event.token_id)
        assert len(top) == 4 and top[0].token_id == event.token_id  # greedy: the chosen one is the top one
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
    assert all(e.logprobs is None for e in plain)


def test_the_last_event_names_the_stop_string_that_ended_it() -> None:
    tok = tokenizer()
    params = SamplingParams(stop=("zz", "lo w"))
    req = Request(seq_id=0, prompt=[1], params=params, max_tokens=50, sampler=Sampler(params),
                  decoder=tok.stream_decoder())
    events = [next_event(req, t, tok.stop_token_ids) for t in tok.encode("Hello world")]
    assert events[-1].finish_reason == "stop" and events[-1].stop_sequence == "lo w"
    assert "".join(e.text for e in events) == "Hel"
    assert all(e.stop_sequence is None for e in events[:-1])
