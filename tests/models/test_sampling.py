"""Sampling: parameter validation, masks, penalties, seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from shoal.models.sampling import (
    Sampler,
    SamplingParams,
    apply_presence_frequency,
    apply_repetition_penalty,
    greedy,
    min_p_mask,
    sample,
    softmax,
    split_at_stop,
    top_k_mask,
    top_p_mask,
)

LOGITS = np.array([1.0, 3.0, 2.0, -1.0, 0.5, 2.5], np.float32)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": 2.5}, "temperature must be between 0 and 2"),
    ({"temperature": -0.1}, "temperature must be between 0 and 2"),
    ({"temperature": float("nan")}, "temperature must be between 0 and 2"),
    ({"temperature": "hot"}, "temperature must be between 0 and 2"),
    ({"top_p": 0.0}, "top_p must be greater than 0 and at most 1"),
    ({"top_p": 1.5}, "top_p must be between 0 and 1"),
    ({"top_k": -1}, "top_k must be a non-negative integer"),
    ({"min_p": 1.5}, "min_p must be between 0 and 1"),
    ({"top_k": 2.5}, "top_k must be a non-negative integer"),
    ({"max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"max_tokens": True}, "max_tokens must be a positive integer"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than 0"),
    ({"presence_penalty": 3.0}, "presence_penalty must be between -2 and 2"),
    ({"frequency_penalty": -2.5}, "frequency_penalty must be between -2 and 2"),
    ({"seed": -5}, "seed must be a non-negative integer"),
    ({"stop": [""]}, "stop strings must not be empty"),
    ({"stop": ["a"] * 9}, "stop may hold at most 8 strings"),
    ({"stop": [1]}, "stop must be a string or a list of strings"),
])
def test_params_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_params_normalise_stop() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    assert SamplingParams().stop == ()
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_greedy_and_temperature_zero() -> None:
    assert greedy(LOGITS) == 1
    rng = np.random.default_rng(0)
    assert all(sample(LOGITS, SamplingParams(temperature=0), rng) == 1 for _ in range(5))


def test_top_k_mask() -> None:
    masked = top_k_mask(LOGITS, 2)
    assert np.isfinite(masked).sum() == 2
    assert set(np.flatnonzero(np.isfinite(masked))) == {1, 5}
    assert np.array_equal(top_k_mask(LOGITS, 0), LOGITS)


def test_top_p_mask() -> None:
    probs = softmax(LOGITS)
    order = np.argsort(-probs)
    # just above the top token's probability: the top two stay
    masked = top_p_mask(LOGITS, float(probs[order[0]]) + 1e-3)
    assert set(np.flatnonzero(np.isfinite(masked))) == {int(order[0]), int(order[1])}
    assert set(np.flatnonzero(np.isfinite(top_p_mask(LOGITS, 1e-6)))) == {int(order[0])}
    assert np.isfinite(top_p_mask(LOGITS, 1.0)).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=50), st.floats(0.01, 1.0))
@example([-1.1192617921916196e-35, 0.0], 0.5)  # found by hypothesis: equal probabilities, distinct logits
def test_top_p_keeps_enough_mass(values: list[float], p: float) -> None:
    logits = np.array(values, np.float32)
    kept = np.isfinite(top_p_mask(logits, p))
    probs = softmax(logits)
    assert probs[kept].sum() >= p - 1e-6
    assert kept[int(np.argmax(logits))]


def test_min_p_mask() -> None:
    # probabilities relative to the top (logit 3.0): exp(-0.5) = 0.61 for 2.5, exp(-1) = 0.37 for 2.0
    kept = np.isfinite(min_p_mask(LOGITS, 0.5))
    assert set(np.flatnonzero(kept)) == {1, 5}
    assert set(np.flatnonzero(np.isfinite(min_p_mask(LOGITS, 0.3)))) == {1, 2, 5}
    assert np.array_equal(min_p_mask(LOGITS, 0.0), LOGITS)


def test_repetition_penalty() -> None:
    out = apply_repetition_penalty(LOGITS, [1, 3, 1], 2.0)
    assert out[1] == pytest.approx(1.5) and out[3] == pytest.approx(-2.0)
    assert out[2] == LOGITS[2]
    assert apply_repetition_penalty(LOGITS, [1], 1.0) is LOGITS


def test_presence_and_frequency_penalties() -> None:
    out = apply_presence_frequency(LOGITS, {1: 3, 2: 1}, presence=0.5, frequency=0.25)
    assert out[1] == pytest.approx(3.0 - 0.5 - 0.75)
    assert out[2] == pytest.approx(2.0 - 0.5 - 0.25)
    assert out[0] == LOGITS[0]


def test_penalty_changes_greedy_choice() -> None:
    params = SamplingParams(temperature=0, frequency_penalty=2.0)
    sampler = Sampler(params)
    first = sampler.next_token(LOGITS)
    second = sampler.next_token(LOGITS)
    assert (first, second) == (1, 5)


def test_seeded_reproducibility() -> None:
    logits = np.random.default_rng(1).normal(size=1000).astype(np.float32) * 3
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1234)
    a = Sampler(params)
    b = Sampler(params)
    seq_a = [a.next_token(logits) for _ in range(30)]
    seq_b = [b.next_token(logits) for _ in range(30)]
    assert seq_a == seq_b
    other = Sampler(SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=99))
    assert [other.next_token(logits) for _ in range(30)] != seq_a
    assert len(set(seq_a)) > 1  # it does sample


def test_sampling_respects_masks_and_distribution() -> None:
    rng = np.random.default_rng(7)
    picks = [sample(LOGITS, SamplingParams(top_k=2), rng) for _ in range(300)]
    assert set(picks) == {1, 5}
    share = picks.count(1) / len(picks)
    expected = 1 / (1 + np.exp(-0.5))  # softmax over logits 3.0 and 2.5
    assert abs(share - expected) < 0.1
    with pytest.raises(ValueError, match="one logits vector"):
        sample(np.zeros((2, 3), np.float32), SamplingParams(), rng)


def test_split_at_stop() -> None:
    assert split_at_stop("Hello wor", ("world",)) == ("Hello ", "wor", False)
    assert split_at_stop("Hello world!", ("world",)) == ("Hello ", "", True)
    assert split_at_stop("a\n\nb", ("\n\n", "b")) == ("a", "", True)
    assert split_at_stop("abc", ()) == ("abc", "", False)
    assert split_at_stop("xx", ("xxy", "x")) == ("", "", True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text("ab\n", max_size=4), max_size=12),
       st.lists(st.text("ab\n", min_size=1, max_size=3), min_size=1, max_size=3))
def test_split_at_stop_streaming_equals_whole_text(pieces: list[str], stops: list[str]) -> None:
    """Feeding text piece by piece emits exactly the text before the first stop string, never more, and
    never a character of the stop string itself."""
    emitted, keep, stopped = "", "", False
    for piece in pieces:
        out, keep, stopped = split_at_stop(keep + piece, stops)
        emitted += out
        if stopped:
            break
    if not stopped:
        emitted += keep
    # Oracle: the first piece after which the text so far holds a stop string ends generation, at the
    # earliest-starting stop string in that text.
    text = ""
    for piece in pieces:
        text += piece
        starts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if starts:
            assert stopped and emitted == text[:min(starts)]
            return
    assert not stopped and emitted == text
