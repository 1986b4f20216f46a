"""The NumPy reference stage: correct answer, span composition, batched decode, chunked prefill, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from shoal.models.errors import ContextOverflowError
from shoal.models.reference import KV_CHUNK, ReferenceStage, rope_norm
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage

from tests.models.shared_model import (
    chat_ids,
    dequantized,
    fresh_seq_id,
    gguf_model,
    reference_stage,
    tokenizer,
)

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def _greedy(stages: list[ReferenceStage], ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits at each step through a chain of stages."""
    seq = fresh_seq_id()
    for st in stages:
        st.add_sequence(seq)
    try:
        x: np.ndarray = np.array(ids, np.int32)
        for st in stages:
            x = st.prefill(seq, x)
        tokens, all_logits = [], [x]
        for _ in range(steps - 1):
            tokens.append(int(all_logits[-1].argmax()))
            x = np.array([tokens[-1]], np.int32)
            for st in stages:
                x = st.decode([seq], x)
            all_logits.append(x[0])
        tokens.append(int(all_logits[-1].argmax()))
        return tokens, all_logits
    finally:
        for st in stages:
            st.remove_sequence(seq)


def test_is_a_stage() -> None:
    stage = reference_stage(0, 30)
    assert isinstance(stage, Stage)
    assert stage.target_kind is None and stage.kv_page_size == 1 and stage.max_total_tokens is None
    assert stage.max_context == stage.config.context_length


def test_answers_paris() -> None:
    tokens, _ = _greedy([reference_stage(0, 30)], chat_ids(PROMPTS[0]), 8)
    assert "Paris" in tokenizer().decode(tokens)


def test_rope_norm_rotates_adjacent_pairs() -> None:
    x = np.zeros((1, 1, 4), np.float32)
    x[0, 0] = [1.0, 0.0, 1.0, 0.0]
    out = rope_norm(x, np.array([1]), theta=10000.0)
    # pair (0, 1) turns by 1 radian; pair (2, 3) by 1/100 radian
    np.testing.assert_allclose(out[0, 0], [np.cos(1), np.sin(1), np.cos(0.01), np.sin(0.01)], rtol=1e-6)
    assert np.allclose(rope_norm(x, np.array([0]), 10000.0), x)


def test_span_composition_matches_whole() -> None:
    whole = reference_stage(0, 30)
    parts = [reference_stage(0, 13), reference_stage(13, 30)]
    ids = chat_ids(PROMPTS[1])
    want_tokens, want_logits = _greedy([whole], ids, 6)
    got_tokens, got_logits = _greedy(parts, ids, 6)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    mid = parts[0]
    seq = fresh_seq_id()
    mid.add_sequence(seq)
    hidden = mid.prefill(seq, np.array(ids[:5], np.int32))
    assert hidden.shape == (5, 576) and hidden.dtype == np.float32
    assert mid.decode([seq], np.array([7], np.int32)).shape == (1, 576)
    mid.remove_sequence(seq)


def test_batched_decode_equals_unbatched() -> None:
    st = reference_stage(0, 30)
    prompts = [chat_ids(p) for p in PROMPTS]
    solo = [_greedy([st], ids, 4) for ids in prompts]
    seqs = [fresh_seq_id() for _ in prompts]
    try:
        logits = []
        for seq, ids in zip(seqs, prompts, strict=True):
            st.add_sequence(seq)
            logits.append(st.prefill(seq, np.array(ids, np.int32)))
        step_logits = [logits]
        for _ in range(3):
            nxt = np.array([int(lg.argmax()) for lg in step_logits[-1]], np.int32)
            step_logits.append(list(st.decode(seqs, nxt)))
        assert [st.sequence_length(s) for s in seqs] == [len(p) + 3 for p in prompts]
        for i, (tokens, want) in enumerate(solo):
            assert [int(step[i].argmax()) for step in step_logits] == tokens
            for step, want_logits in zip(step_logits, want, strict=True):
                np.testing.assert_allclose(step[i], want_logits, atol=1e-4, rtol=0)
    finally:
        for seq in seqs:
            st.remove_sequence(seq)


def test_chunked_prefill_and_cache_growth() -> None:
    """A prompt longer than one KV chunk, prefilled in pieces, equals one prefill; all_logits agrees."""
    st = reference_stage(0, 30)
    text = " ".join(f"item{i}" for i in range(120))
    ids = tokenizer().encode(text)
    assert len(ids) > KV_CHUNK
    one, two = fresh_seq_id(), fresh_seq_id()
    st.add_sequence(one)
    st.add_sequence(two)
    try:
        every = st.prefill(one, np.array(ids, np.int32), all_logits=True)
        assert every.shape == (len(ids), 49152)
        cut = [0, 100, 101, 256, len(ids)]
        for a, b in itertools.pairwise(cut):
            last = st.prefill(two, np.array(ids[a:b], np.int32))
            np.testing.assert_allclose(last, every[b - 1], atol=1e-4, rtol=0)
        assert st.sequence_length(two) == len(ids)
    finally:
        st.remove_sequence(one)
        st.remove_sequence(two)
        st.remove_sequence(two)  # idempotent


def test_errors() -> None:
    st = reference_stage(0, 30)
    seq = fresh_seq_id()
    with pytest.raises(ValueError, match=f"unknown sequence {seq}; call add_sequence first"):
        st.prefill(seq, np.array([1, 2], np.int32))
    st.add_sequence(seq)
    try:
        with pytest.raises(ValueError, match=f"sequence {seq} exists already"):
            st.add_sequence(seq)
        with pytest.raises(ValueError, match="non-negative int"):
            st.add_sequence(-1)
        with pytest.raises(ValueError, match=r"1-D array of token ids"):
            st.prefill(seq, np.zeros((2, 576), np.float32))
        with pytest.raises(ValueError, match=r"token ids must be in 0..49151"):
            st.prefill(seq, np.array([49152], np.int32))
        with pytest.raises(ValueError, match="at least one token"):
            st.prefill(seq, np.array([], np.int32))
        with pytest.raises(ValueError, match="2 inputs for 1 sequences"):
            st.decode([seq], np.array([1, 2], np.int32))
        with pytest.raises(ValueError, match="same sequence twice"):
            st.decode([seq, seq], np.array([1, 2], np.int32))
    finally:
        st.remove_sequence(seq)
    tail = reference_stage(0, 30)
    assert tail is st


def test_context_overflow_and_hidden_input_checks() -> None:
    small = ReferenceStage(gguf_model(), LayerSpan(29, 30), max_context=8, load=dequantized)
    small.add_sequence(0)
    small.prefill(0, np.zeros((6, 576), np.float32))
    with pytest.raises(ContextOverflowError, match="sequence 0 would hold 9 tokens, past the context of 8"):
        small.prefill(0, np.zeros((3, 576), np.float32))
    with pytest.raises(ValueError, match=r"stage 29:30 takes hidden states \[n, 576\], got \[3\]"):
        small.prefill(0, np.zeros(3, np.int32))
    assert small.decode([0], np.zeros((1, 576), np.float32)).shape == (1, 49152)
    small.close()
    small.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        small.add_sequence(1)
