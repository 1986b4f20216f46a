"""Grammar-constrained sampling (models/grammar.py through `Sampler`): on 120 generated JSON Schemas (nested
objects, arrays, enums, bounded strings and integers), every document the sampler completes over the real
SmolLM2 vocabulary with random logits is valid under `jsonschema`; and the engine's own answers are."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shoal.models.generate import Engine
from shoal.models.grammar import Constraint, GrammarError, GrammarMatcher, check_constraint
from shoal.models.sampling import Sampler, SamplingParams

from tests.models.shared_model import chat_ids, gguf_model, reference_stage, tokenizer

MAX_STEPS = 600
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
LEAVES = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 5000)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda items: {"enum": items},
              st.lists(st.one_of(NAMES, st.integers(-50, 50)), min_size=1, max_size=4, unique=True)),
)


def _object(props: dict[str, Any], data: st.DataObject | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


SCHEMAS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.builds(lambda items, most: {"type": "array", "items": items, "maxItems": most},
                  inner, st.integers(0, 3)),
        st.builds(_object, st.dictionaries(NAMES, inner, min_size=1, max_size=4)),
    ),
    max_leaves=8,
)
TOP = st.builds(_object, st.dictionaries(NAMES, SCHEMAS, min_size=1, max_size=4))


def _vocab() -> int:
    return gguf_model().config.vocab_size


def _complete(schema: dict[str, Any], seed: int) -> str:
    """Sample a document under `schema` from random logits; the text once the grammar is complete."""
    tok = tokenizer()
    params = SamplingParams(temperature=1.0, seed=seed, constraint=Constraint.json_schema(schema))
    constraint = params.constraint
    assert constraint is not None
    sampler = Sampler(params, (), lambda: GrammarMatcher(constraint, tok, _vocab()))
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(MAX_STEPS):
        token = sampler.next_token(rng.standard_normal(_vocab()).astype(np.float32) * 3)
        if token in tok.stop_token_ids:
            break
        out.append(token)
    else:
        pytest.fail(f"no complete document in {MAX_STEPS} tokens: {tok.decode(out)[:200]!r}")
    assert sampler.matcher is not None and sampler.matcher.done
    return tok.decode(out)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=TOP, seed=st.integers(0, 2**32 - 1))
def test_every_completed_document_is_valid(schema: dict[str, Any], seed: int) -> None:
    text = _complete(schema, seed)
    jsonschema.validate(json.loads(text), schema)


def test_unconstrained_requests_have_no_matcher() -> None:
    assert Sampler(SamplingParams()).matcher is None
    assert not SamplingParams(temperature=0, constraint=Constraint("json_object")).plain_greedy


def test_constraints_are_checked() -> None:
    with pytest.raises(ValueError, match="constraint kind"):
        Constraint("xml")  # type: ignore[arg-type]
    tok, vocab = tokenizer(), _vocab()
    with pytest.raises(GrammarError):
        check_constraint(Constraint("json_schema", '{"type": "object", "properties": 5}'), tok, vocab)
    with pytest.raises(GrammarError):
        check_constraint(Constraint("lark", "start: ("), tok, vocab)
    check_constraint(Constraint.json_schema({"type": "array", "items": {"enum": [1, 2]}}), tok, vocab)
    wire = SamplingParams(constraint={"kind": "json_object", "spec": ""})  # type: ignore[arg-type]
    assert wire.constraint == Constraint("json_object")


async def test_engine_answers_match_the_schema() -> None:
    schema = {"type": "object", "properties": {
        "capital": {"type": "string", "maxLength": 20},
        "country": {"enum": ["France", "Spain", "Italy"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 2},
    }, "required": ["capital", "country", "population_millions", "landmarks"], "additionalProperties": False}
    params = SamplingParams(temperature=0, max_tokens=120, constraint=Constraint.json_schema(schema))
    loose = SamplingParams(temperature=0, max_tokens=120, constraint=Constraint("json_object"))
    async with Engine([reference_stage(0, 30)], tokenizer()) as engine:
        answer = await engine.generate_text(chat_ids("Describe the capital of France as JSON."), params)
        any_object = await engine.generate_text(chat_ids("Describe the capital of France as JSON."), loose)
    assert answer.finish_reason == "stop", answer.text
    jsonschema.validate(json.loads(answer.text), schema)
    assert any_object.finish_reason == "stop", any_object.text
    assert isinstance(json.loads(any_object.text), dict)
