"""Spans a member holds loaded (issue 17): advertised in `shards` (validated on receipt), counted against the
memory it offers while in use (idle ones closed when the budget needs the room), and planned as needing no new
memory and no fetch on the device that holds them, so a repeated request lands where it did."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from shoal.mesh.p2p.gossip import MAX_SHARDS, clean_advert, clean_shards
from shoal.mesh.split.held_spans import busy_bytes, held_of, offered_budget, shard_entries, span_bytes
from shoal.mesh.split.partition import allocate_around
from shoal.mesh.split.plan_inputs import advert_device
from shoal.mesh.split.router import STAGE_OVERHEAD, models_left
from shoal.mesh.split.scheduler import LOCAL, NoPlanError, Request, plan
from shoal.mesh.split.stage_host import StageHost
from shoal.models.embedded import embedded_model_path
from shoal.models.span import LayerSpan

from tests.mesh.test_scheduler import OPEN, SHAPE, GiB, MiB, dev
from tests.mesh.test_split_inprocess import MODEL, factory, gate_open

CID = "bafkreiexamplecid0000000000000000000000000000000000000"
SHARD = {"model": "smollm2", "cid": CID, "start": 0, "stop": 15, "bytes": 60 * MiB, "idle": False}
REQ = Request(prompt_tokens=200, max_tokens=128, overhead_bytes=STAGE_OVERHEAD)


# --- the advert's `shards`, as received -------------------------------------------------------------------

def test_good_shards_are_kept_as_sent() -> None:
    idle = {**SHARD, "cid": None, "start": 15, "stop": 30, "idle": True}
    assert clean_shards([SHARD, idle], "p" * 40) == [SHARD, idle]
    assert clean_advert({"shards": [SHARD]}, "p" * 40)["shards"] == [SHARD]


@pytest.mark.parametrize("junk", [
    "x", 3, None, [], {"model": "smollm2"},
    {**SHARD, "model": ""}, {**SHARD, "model": 5}, {**SHARD, "model": "m" * 201},
    {**SHARD, "cid": "not/a cid"}, {**SHARD, "cid": 7}, {**SHARD, "cid": "c" * 129},
    {**SHARD, "start": True}, {**SHARD, "start": 1.0}, {**SHARD, "start": -1}, {**SHARD, "start": 15},
    {**SHARD, "stop": 1 << 17}, {**SHARD, "bytes": -1}, {**SHARD, "bytes": 1 << 51}, {**SHARD, "bytes": "1"},
])
def test_junk_shards_are_skipped_with_a_log_line(junk, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="shoal.mesh.p2p.gossip"):
        kept = clean_shards([junk, SHARD], "junkpeer" * 5)
    assert kept == [SHARD]
    assert "advert of junkpeerjunk: 1 shards entry skipped" in caplog.text


def test_shards_that_are_not_a_list_or_too_many_never_break_the_advert(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="shoal.mesh.p2p.gossip"):
        assert clean_advert({"shards": {"a": 1}, "models": ["m"]})["shards"] == []
        assert clean_advert({"models": ["m"]})["shards"] == []  # absent: nothing to say
        many = clean_shards([dict(SHARD, start=i, stop=i + 1) for i in range(MAX_SHARDS + 10)], "p")
    assert len(many) == MAX_SHARDS and many[-1]["start"] == MAX_SHARDS - 1
    assert caplog.text.count("skipped") == 2


# --- a peer as the planner sees it ------------------------------------------------------------------------

def _peer(shards: list, in_use: list | None = None, cid: str | None = None):
    advert = {"shards": shards, "speed": {"smollm2": {"decode_tok_s": 100.0}},
              "split": {"serve_others": True, "memory_budget": 10 * MiB, "in_use": in_use or []}}
    return advert_device("peer", advert, "smollm2", holds=False, trusted=True, rtt_s=0.001, link="host",
                         cid=cid, num_layers=30)


def test_advert_device_reads_held_spans_by_name_or_cid() -> None:
    other = {**SHARD, "model": "qwen", "cid": "bafyother", "start": 0, "stop": 30}
    past_end = {**SHARD, "start": 20, "stop": 40}
    assert _peer([SHARD, other, past_end, "junk"]).held == (LayerSpan(0, 15),)
    by_cid = {**SHARD, "model": "an-alias"}
    assert _peer([by_cid]).held == ()
    assert _peer([by_cid], cid=CID).held == (LayerSpan(0, 15),)


def _advertised(split: object, cid: str | None = CID, holds: bool = False):
    advert = {"speed": {"smollm2": {"decode_tok_s": 100.0}}, "split": split}
    if isinstance(split, dict):
        advert["split"] = {"serve_others": True, "memory_budget": 40 * MiB, **split}
    return advert_device("peer", advert, "smollm2", holds=holds, trusted=True, rtt_s=0.001, link="host",
                         cid=cid, num_layers=30)


def test_advert_device_reads_the_loaded_model_by_name_or_cid() -> None:
    by_name = _advertised({"in_use": ["qwen", "smollm2"]})
    assert by_name.loaded and by_name.holds_model  # an engine with it loaded holds its weights
    assert _advertised({"in_use": [CID]}).loaded
    assert _advertised({"in_use": ["an-alias"], "catalog": {"an-alias": CID}}).loaded
    assert not _advertised({"in_use": ["an-alias"], "catalog": {"an-alias": CID}}, cid=None).loaded
    assert not _advertised({"in_use": ["qwen"], "catalog": {"qwen": "bafyother"}}).loaded
    assert not _advertised({"in_use": []}).holds_model


@pytest.mark.parametrize("split", [
    {"in_use": "smollm2"}, {"in_use": [3, None, {"model": "smollm2"}, ["smollm2"], "", "s" * 201]},
    {"in_use": {"smollm2": True}}, {"in_use": ["an-alias"], "catalog": {"an-alias": 5}},
    {"in_use": ["an-alias"], "catalog": ["an-alias", CID]}, {}, ["in_use", "smollm2"], "smollm2", None,
])
def test_junk_in_use_reads_as_not_loaded(split) -> None:
    assert not _advertised(split).loaded


def test_a_peer_advertising_the_model_in_use_takes_an_offload_its_budget_could_not_load_again() -> None:
    """A 40 MiB budget (net of the model it has loaded) is far below the model's ~140 MiB, above this
    request's KV cache and overhead: an offload of the model it has loaded goes there."""
    loaded = _advertised({"in_use": ["smollm2"]})
    chosen = plan(SHAPE, REQ, dev(LOCAL, tps=10), [loaded], OPEN)
    assert chosen.kind == "offload" and chosen.devices == ["peer"]
    not_loaded = _advertised({"in_use": ["qwen"]}, holds=True)  # holds the file, has it not loaded
    assert plan(SHAPE, REQ, dev(LOCAL, tps=10), [not_loaded], OPEN).kind != "offload"


# --- the planner ------------------------------------------------------------------------------------------

def test_allocate_around_pins_held_spans_past_their_caps() -> None:
    speeds, caps = [1.0, 1.0, 1.0], [5, 30, 30]
    assert allocate_around(30, speeds, caps, [LayerSpan(0, 12), None, None]) == [12, 9, 9]
    assert allocate_around(30, speeds, caps, [None, LayerSpan(5, 20), None]) == [5, 15, 10]
    assert allocate_around(30, speeds, [10, 30, 30], [None, LayerSpan(6, 20), None]) == [6, 14, 10]
    assert allocate_around(30, speeds, [5, 30, 30], [None, LayerSpan(8, 20), None]) is None  # 0:8 over cap 5
    assert allocate_around(30, speeds, caps, [LayerSpan(0, 10), LayerSpan(12, 20), None]) is None  # a gap
    assert allocate_around(30, [1.0, 1.0], [30, 30], [LayerSpan(0, 10), LayerSpan(10, 30)]) == [10, 20]


def test_a_peer_holding_the_span_is_chosen_though_its_budget_is_below_it() -> None:
    """Origin and helper hold nothing and fetch (the big-split case); a budget of 10 MiB is less than either
    half of the model, so only the member holding 15:30 already makes a plan possible, with that very span."""
    holder = dev("holder", mem=10 * MiB, holds_model=False, fetch_bps=4 * MiB, held=(LayerSpan(15, 30),))
    local = dev(LOCAL, mem=GiB, holds_model=False, fetch_bps=4 * MiB)
    chosen = plan(SHAPE, REQ, local, [holder], OPEN)
    assert chosen.kind == "split"
    assert [(a.device, str(a.span)) for a in chosen.stages] == [(LOCAL, "0:15"), ("holder", "15:30")]
    # without the span, the same budget is no room for any stage: the peer is not chosen
    lacking = dataclasses.replace(holder, held=())
    with pytest.raises(NoPlanError) as refused:
        plan(SHAPE, REQ, dataclasses.replace(local, free_memory=100 * MiB, total_memory=100 * MiB), [lacking],
             OPEN)
    assert refused.value.code == "insufficient_memory"
    assert plan(SHAPE, REQ, local, [lacking], OPEN).devices == [LOCAL]


def test_a_held_span_costs_no_fetch_so_the_repeat_lands_where_it_did() -> None:
    """Three members without the file, each able to hold any half: the first plan fetches; once they hold
    its spans, the same request is planned onto the same spans with no fetch in its prediction."""
    members = [dev(n, mem=SHAPE.span_memory(LayerSpan(0, 16), 328, STAGE_OVERHEAD), holds_model=False,
                   fetch_bps=4 * MiB) for n in ("a", "b")]
    local = dev(LOCAL, mem=SHAPE.span_memory(LayerSpan(0, 16), 328, STAGE_OVERHEAD), holds_model=False,
                fetch_bps=4 * MiB)
    first = plan(SHAPE, REQ, local, members, OPEN)
    assert first.kind == "split"
    held = {a.device: a.span for a in first.stages}
    # the members' budgets now have room for nothing more; they hold their spans
    again_local = dataclasses.replace(local, free_memory=0, held=(held[LOCAL],) if LOCAL in held else ())
    again = [dataclasses.replace(m, free_memory=0, held=(held[m.id],) if m.id in held else ())
             for m in members]
    repeat = plan(SHAPE, REQ, again_local, again, OPEN)
    assert [(a.device, a.span) for a in repeat.stages] == [(a.device, a.span) for a in first.stages]
    assert repeat.prediction.ttft_s < first.prediction.ttft_s / 10  # no fetch this time


# --- the host: what it holds, what that takes from the budget, and closing idle spans for room ------------

def test_the_offered_budget_subtracts_spans_in_use() -> None:
    models = {"budget": 1000 * MiB, "used": 200 * MiB, "hosted": 0}
    assert offered_budget(4 * GiB, 900 * MiB, models) == 800 * MiB  # what the models budget leaves
    assert offered_budget(4 * GiB, 900 * MiB, {**models, "hosted": 300 * MiB}) == 500 * MiB
    assert offered_budget(4 * GiB, 400 * MiB, {**models, "hosted": 300 * MiB}) == 100 * MiB  # the share cap
    assert offered_budget(50 * MiB, 900 * MiB, {**models, "hosted": 300 * MiB}) == 50 * MiB  # available
    assert offered_budget(4 * GiB, 900 * MiB, {**models, "hosted": 2 * GiB}) == 0


def test_models_left_counts_spans_in_use() -> None:
    assert models_left({"budget": 100, "used": 30, "hosted": 50}) == 20
    assert models_left({"budget": 100, "used": 30}) == 70
    assert models_left({"budget": 100, "used": 80, "hosted": 50}) == 0


async def test_host_counts_spans_in_use_and_closes_idle_ones_for_room() -> None:
    size = embedded_model_path().stat().st_size
    limit = [1 << 40]
    host = StageHost(factory, gate_open, limit=lambda: limit[0],
                     sizer=lambda name, span, stage: span_bytes(stage, size, STAGE_OVERHEAD))
    try:
        await host.open("peer", {"model": MODEL, "span": "0:10", "seq": 1, "cid": CID})
        first = host.stages[0]
        assert first.nbytes == span_bytes(first.stage, size, STAGE_OVERHEAD) > STAGE_OVERHEAD
        assert busy_bytes(host.stages) == first.nbytes
        assert held_of(host.stages, MODEL) == held_of(host.stages, "alias", CID) == (LayerSpan(0, 10),)
        entries = shard_entries(host.stages, lambda name: None)
        assert entries == [{"model": MODEL, "cid": CID, "start": 0, "stop": 10, "bytes": first.nbytes,
                            "idle": False}]
        assert clean_shards(entries) == entries  # what a peer keeps of it
        # the same CID under another name reuses the stage (the factory knows no "alias": it would fail)
        await host.open("peer", {"model": "alias", "span": "0:10", "seq": 2, "cid": CID})
        assert len(host.stages) == 1
        await host.close("peer", {"seq": 1})
        await host.close("peer", {"seq": 2})
        assert busy_bytes(host.stages) == 0 and shard_entries(host.stages, lambda n: None)[0]["idle"]
        # a span in use is never closed for room, an idle one is
        await host.open("peer", {"model": MODEL, "span": "10:20", "seq": 3})
        second = next(h for h in host.stages if h.key[1] == LayerSpan(10, 20))
        assert await host.trim_to(0) == 1
        assert [h.key[1] for h in host.stages] == [LayerSpan(10, 20)]
        # building a new stage past the limit closes the idle ones (least recently used first), not itself
        await host.close("peer", {"seq": 3})
        limit[0] = second.nbytes + 1
        await host.open("peer", {"model": MODEL, "span": "20:30", "seq": 4})
        assert [h.key[1] for h in host.stages] == [LayerSpan(20, 30)]
    finally:
        await host.stop()
