"""`split.warming`'s pure parts: what a plan at a peer that has a model in use would put on this node, and
the `split.in_use` advert reader (the whole path over real nodes: test_warming_nodes.py)."""

from __future__ import annotations

import os

import pytest
from shoal.mesh.split import scheduler as sched
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.warming import (
    STAGE_OVERHEAD,
    WARM_MAX_TOKENS,
    WARM_PROMPT_TOKENS,
    advert_in_use,
    likely_part,
)
from shoal.models.embedded import embedded_model_path
from shoal.models.loader import open_model
from shoal.models.span import LayerSpan

MIB = 1 << 20


@pytest.fixture(scope="module")
def shape() -> sched.ModelShape:
    path = embedded_model_path()
    return sched.ModelShape.from_config(open_model(path).config, os.path.getsize(path))


def origin(decode_tok_s: float | None = None, **extra: object) -> dict:
    speed = {} if decode_tok_s is None else {"m": {"decode_tok_s": decode_tok_s}}
    return {"models": ["m"], "speed": speed, "split": {"serve_others": True, "memory_budget": 1}, **extra}


def me(budget_mb: int, decode_tok_s: float = 10.0, measured: bool = False) -> sched.Device:
    return sched.Device("p5uame", decode_tok_s, 0.0, budget_mb * MIB, budget_mb * MIB, measured=measured,
                        rtt_s=0.001)


def test_a_member_that_can_hold_the_model_expects_an_offload(shape):
    assert likely_part(shape, "m", origin(8.0), me(400)) == ("offload", [LayerSpan.whole(30)])


def test_a_member_too_small_for_the_model_expects_a_span_that_fits_its_budget(shape):
    context = WARM_PROMPT_TOKENS + WARM_MAX_TOKENS
    for budget in (60, 80, 120):
        kind, spans = likely_part(shape, "m", origin(8.0), me(budget))
        assert kind == "split" and len(spans) == 1, (budget, kind, spans)
        assert 0 < len(spans[0]) < 30
        assert shape.span_memory(spans[0], context, STAGE_OVERHEAD) <= budget * MIB
    # the bigger the budget, the more layers (up to the speed-proportional share)
    sizes = [len(likely_part(shape, "m", origin(8.0), me(b))[1][0]) for b in (60, 80, 120)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_the_span_follows_the_origins_speed(shape):
    """An unmeasured member is taken as no faster than the origin: beside a faster origin a split gives it
    as little as it can; beside one no faster, an even share."""
    assert likely_part(shape, "m", origin(40.0), me(120))[1] == [LayerSpan(0, 1)]
    assert len(likely_part(shape, "m", origin(5.0), me(120))[1][0]) == 15


def test_a_member_without_room_for_even_one_layer_expects_nothing(shape):
    assert likely_part(shape, "m", origin(8.0), me(20)) == ("local", [])


def test_junk_in_the_origins_advert_reads_as_absent(shape):
    junk = origin(None, queue_depth="many", battery=float("nan"))
    junk["speed"] = {"m": {"decode_tok_s": "fast"}}
    kind, spans = likely_part(shape, "m", junk, me(120))
    assert kind == "split" and spans
    assert likely_part(shape, "m", origin(-5.0), me(120)) == ("local", [])  # no device: nothing expected


def test_in_use_reader_keeps_only_names():
    assert advert_in_use({"split": {"in_use": ["a", 3, "", "b" * 300, {"x": 1}, "c"]}}) == ["a", "c"]
    assert advert_in_use({"split": {"in_use": "a"}}) == []
    assert advert_in_use({"split": []}) == []
    assert advert_in_use({}) == []


def test_warming_switches_are_validated():
    assert SplitConfig().warm_peers_models is True and SplitConfig().warm_fetch_spans is False
    with pytest.raises(ValueError, match="warm_peers_models"):
        SplitConfig(warm_peers_models=1)  # type: ignore[arg-type]
