"""Pure parts of planning a model no member holds alone: reading members' `split.catalog` adverts, choosing
the CID a name stands for, and the planner's `insufficient_memory` when the budgets together fall short."""

from __future__ import annotations

import pytest
from shoal.mesh.split import scheduler as sched
from shoal.mesh.split.policy import PolicyConfig
from shoal.mesh.split.span_model import MAX_CATALOG, advert_catalog, cid_in_adverts
from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan

CID_A = "bafybeicxmdn4iwzenr3eljmajddiyj2mxnskt4itygie77555gbnstx7ci"
CID_B = "bafybeibaros6mix6pgmzxehm5tdwmn42nd5ceveav5alfeuspgqortpmue"


def advert(catalog: object) -> dict:
    return {"split": {"serve_others": True, "memory_budget": 1 << 30, "catalog": catalog}}


def test_catalog_keeps_only_well_formed_entries():
    raw = {"big": CID_A, "bad-cid": "not a cid!", "": CID_B, "n" * 201: CID_B, "num": 5, "ok": CID_B}
    assert advert_catalog(advert(raw)) == {"big": CID_A, "ok": CID_B}
    for broken in ([CID_A], "big", None, 7):
        assert advert_catalog(advert(broken)) == {}
    assert advert_catalog({"split": "no"}) == {}
    assert advert_catalog({}) == {}
    many = {f"m{i}": CID_A for i in range(MAX_CATALOG + 10)}
    assert len(advert_catalog(advert(many))) == MAX_CATALOG


def test_cid_for_a_name_or_a_cid():
    adverts = [advert({"big": CID_A}), advert({"big": CID_A, "other": CID_B}), advert({"big": CID_B}), {}]
    assert cid_in_adverts("big", adverts) == CID_A  # the CID most members name
    assert cid_in_adverts("other", adverts) == CID_B
    assert cid_in_adverts(CID_B, adverts) == CID_B  # a CID some member holds stands for itself
    assert cid_in_adverts("missing", adverts) is None
    assert cid_in_adverts("big", []) is None
    tie = [advert({"big": CID_B}), advert({"big": CID_A})]
    assert cid_in_adverts("big", tie) == min(CID_A, CID_B)  # ties: deterministic


def _shape() -> sched.ModelShape:
    config = ModelConfig(architecture="llama", num_layers=28, hidden_size=3072, intermediate_size=8192,
                         num_heads=24, num_kv_heads=8, head_dim=128, vocab_size=49152, context_length=4096,
                         rope_theta=500000.0, rms_eps=1e-5, tie_embeddings=True)
    return sched.ModelShape.from_config(config, 1_813_981_888)


def _peer(name: str, budget: int, holds: bool) -> sched.Device:
    return sched.Device(name, 10.0, 0.0, budget, budget, holds_model=holds, fetch_bps=0.0 if holds else 4e6)


def test_budgets_force_a_three_stage_split_and_too_little_is_insufficient_memory():
    shape = _shape()
    request = sched.Request(40, 8, overhead_bytes=16 << 20)
    whole = shape.span_memory(LayerSpan.whole(28), request.context_tokens, 16 << 20)
    budget = int(0.45 * whole)
    local = sched.Device(sched.LOCAL, 10.0, 0.0, budget, budget, holds_model=False, fetch_bps=4e6)
    peers = [_peer("helper", budget, False), _peer("publisher", budget, True)]
    policy = PolicyConfig(max_memory_share=1.0)
    plan = sched.plan(shape, request, local, peers, policy)
    assert plan.kind == "split" and sorted(plan.devices) == ["helper", "local", "publisher"], plan
    assert plan.stages[0].span.start == 0 and plan.stages[-1].span.stop == 28
    for peer_set in (peers[:1], peers[1:]):  # no two members can hold it
        with pytest.raises(sched.NoPlanError) as two:
            sched.plan(shape, request, local, peer_set, policy)
        assert two.value.code == "insufficient_memory"
    small = int(0.25 * whole)
    tight = [_peer("helper", small, False), _peer("publisher", small, True)]
    with pytest.raises(sched.NoPlanError) as failed:
        sched.plan(shape, request, sched.Device(sched.LOCAL, 10.0, 0.0, small, small, holds_model=False,
                                                fetch_bps=4e6), tight, policy)
    assert failed.value.code == "insufficient_memory"
    assert "not enough memory" in str(failed.value)
    with pytest.raises(sched.NoPlanError) as nobody:  # nothing usable at all is not a memory problem
        sched.plan(shape, request, None, [], policy)
    assert nobody.value.code == "no_route"
