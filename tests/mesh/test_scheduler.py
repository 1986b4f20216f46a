"""The planner: local / offload / split choices, layer ranges, memory caps and policy."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from shoal.mesh.split.cost_model import predict, request_memory
from shoal.mesh.split.partition import allocate_fastest_first, allocate_proportional
from shoal.mesh.split.plan_inputs import MAX_LINKS, advert_device, advert_links
from shoal.mesh.split.policy import PolicyConfig
from shoal.mesh.split.scheduler import (
    LOCAL,
    Device,
    ModelShape,
    NoPlanError,
    Request,
    max_layers,
    plan,
)
from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan

MiB = 1 << 20
GiB = 1 << 30

SMOLLM2 = ModelConfig(
    architecture="llama",
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    context_length=8192,
    rope_theta=100000.0,
    rms_eps=1e-5,
    tie_embeddings=True,
)
SHAPE = ModelShape.from_config(SMOLLM2, 98_000_000)
REQ = Request(prompt_tokens=200, max_tokens=128, overhead_bytes=10 * MiB)
OPEN = PolicyConfig(
    serve_others=True, battery_floor=20, max_memory_share=1.0, trusted_only_splits=False, prefer_local=False
)


def dev(id: str, tps: float = 100.0, mem: int = 4 * GiB, **kw) -> Device:
    return Device(
        id=id,
        decode_tps=tps,
        prefill_tps=tps * 3,
        free_memory=mem,
        total_memory=mem,
        rtt_s=0.0 if id == LOCAL else kw.pop("rtt_s", 0.001),
        **kw,
    )


def linked(id: str, **kw) -> Device:
    """A peer this node links to directly (`Device.offload_link`), as a chain needs."""
    return dev(id, offload_link=True, **kw)


def tiles(stages, num_layers: int) -> bool:
    start = 0
    for a in stages:
        if a.span.start != start:
            return False
        start = a.span.stop
    return start == num_layers


def test_shape_from_config_adds_up() -> None:
    total = SHAPE.num_layers * SHAPE.layer_bytes + SHAPE.embed_bytes
    assert abs(total - 98_000_000) < 1000  # tied head: the embedding is stored once
    assert SHAPE.head_bytes >= SHAPE.embed_bytes
    assert SHAPE.kv_bytes_per_token_layer == 2 * 3 * 64 * 2  # K and V, 3 KV heads of 64, fp16 pages
    assert ModelShape.from_config(SMOLLM2, 98_000_000, "f32").kv_bytes_per_token_layer == 2 * 3 * 64 * 4
    whole = LayerSpan(0, 30)
    assert SHAPE.span_compute_bytes(whole) == SHAPE.compute_bytes


def test_local_when_it_fits_and_prefer_local() -> None:
    pol = dataclasses.replace(OPEN, prefer_local=True)
    p = plan(SHAPE, REQ, dev(LOCAL, tps=10), [dev("fast", tps=1000)], pol)
    assert p.kind == "local" and p.devices == [LOCAL]


def test_offload_to_much_faster_peer_without_prefer_local() -> None:
    p = plan(SHAPE, REQ, dev(LOCAL, tps=10), [dev("fast", tps=1000)], OPEN)
    assert p.kind == "offload" and p.devices == ["fast"]
    assert p.prediction.ttlt_s < 128 / 10


def test_equal_peer_loses_to_local_by_its_link() -> None:
    p = plan(SHAPE, REQ, dev(LOCAL), [dev("twin", rtt_s=0.05)], OPEN)
    assert p.kind == "local"


def test_node_without_model_offloads() -> None:
    p = plan(SHAPE, REQ, dev(LOCAL, holds_model=False), [dev("has", tps=50)], OPEN)
    assert p.kind == "offload" and p.devices == ["has"]


def test_no_local_device_offloads() -> None:
    assert plan(SHAPE, REQ, None, [dev("peer")], OPEN).devices == ["peer"]


def test_memory_capped_local_splits_with_a_peer() -> None:
    local = dev(LOCAL, mem=90 * MiB)  # holds some layers and the embedding, not the whole model
    peer = dev("peer", mem=90 * MiB)
    p = plan(SHAPE, REQ, local, [peer], OPEN)
    assert p.kind == "split"
    assert sorted(p.devices) == [LOCAL, "peer"]
    assert tiles(p.stages, 30)
    for i, a in enumerate(p.stages):
        d = local if a.device == LOCAL else peer
        assert SHAPE.span_memory(a.span, REQ.context_tokens, REQ.overhead_bytes) <= d.memory_budget(OPEN)
        assert len(a.span) <= max_layers(SHAPE, REQ, d, OPEN, i == 0, i == len(p.stages) - 1)


def test_peer_without_the_model_hosts_a_span_but_takes_no_offload() -> None:
    fetcher = dev("fetcher", tps=1000, holds_model=False, fetch_bps=8 * MiB)
    assert plan(SHAPE, REQ, dev(LOCAL, tps=1), [fetcher], OPEN).kind != "offload"
    p = plan(SHAPE, REQ, dev(LOCAL, mem=90 * MiB), [fetcher], OPEN)
    assert p.kind == "split" and "fetcher" in p.devices
    slow = dataclasses.replace(fetcher, fetch_bps=1.0)
    slow_fetch = plan(SHAPE, REQ, dev(LOCAL, mem=90 * MiB), [slow], OPEN)
    assert slow_fetch.prediction.ttft_s > p.prediction.ttft_s + 1000  # fetching the span is in the TTFT
    with pytest.raises(NoPlanError):
        plan(SHAPE, REQ, dev(LOCAL, mem=90 * MiB), [dataclasses.replace(fetcher, fetch_bps=0.0)], OPEN)


def test_a_peer_with_the_model_loaded_takes_an_offload_within_a_budget_net_of_it() -> None:
    """A peer's advertised budget is net of the models its engine has loaded: one whose budget is far below
    a second copy of the weights still takes an offload of the model it has loaded (only the request's KV
    cache and overhead are new there); the same peer without it loaded does not (the whole model would be)."""
    kv_only = request_memory(SHAPE, REQ)
    assert kv_only == REQ.context_tokens * SHAPE.kv_bytes_per_token_layer * 30 + REQ.overhead_bytes
    whole = SHAPE.span_memory(LayerSpan(0, 30), REQ.context_tokens, REQ.overhead_bytes)
    small = dev("small", tps=1000, mem=40 * MiB, loaded=True)
    assert kv_only < 40 * MiB < whole
    p = plan(SHAPE, REQ, dev(LOCAL, tps=10), [small], OPEN)
    assert p.kind == "offload" and p.devices == ["small"]
    assert plan(SHAPE, REQ, None, [dataclasses.replace(small, free_memory=kv_only, total_memory=kv_only)],
                OPEN).devices == ["small"]  # exactly the request's KV and overhead: fits
    # not loaded: today's rule, a whole second copy must fit, so no offload
    unloaded = dataclasses.replace(small, loaded=False)
    assert plan(SHAPE, REQ, dev(LOCAL, tps=10), [unloaded], OPEN).kind != "offload"
    with pytest.raises(NoPlanError) as refused:
        plan(SHAPE, REQ, None, [unloaded], OPEN)
    assert refused.value.code == "insufficient_memory" and "loaded" not in str(refused.value)


def test_a_loaded_peer_too_small_for_the_request_kv_takes_no_offload() -> None:
    kv_only = request_memory(SHAPE, REQ)
    tiny = dev("tiny", tps=1000, mem=kv_only - 1, loaded=True)
    assert plan(SHAPE, REQ, dev(LOCAL, tps=10), [tiny], OPEN).kind == "local"
    with pytest.raises(NoPlanError) as refused:
        plan(SHAPE, REQ, None, [tiny], OPEN)
    message = str(refused.value)
    assert refused.value.code == "insufficient_memory"
    assert message.startswith("not enough memory") and "a peer with it loaded (tiny)" in message
    assert f"{kv_only / MiB:.0f} MiB for an offload" in message


def test_the_local_engines_loaded_model_runs_here_within_a_budget_net_of_it() -> None:
    """This node's budget (the memory available now, under its share) is net of the model its engine has
    loaded: with it loaded, a local run needs only the request's KV cache and overhead; without, all of it."""
    kv_only = request_memory(SHAPE, REQ)
    peers = [dev("a", mem=150 * MiB), dev("b", mem=150 * MiB)]
    tight = dataclasses.replace(OPEN, prefer_local=True)
    loaded = dev(LOCAL, mem=kv_only, loaded=True)
    assert plan(SHAPE, REQ, loaded, peers, tight).kind == "local"
    assert plan(SHAPE, REQ, loaded, [], OPEN).kind == "local"
    assert plan(SHAPE, REQ, dataclasses.replace(loaded, loaded=False), peers, tight).kind != "local"
    short = dataclasses.replace(loaded, free_memory=kv_only - 1, total_memory=kv_only - 1)
    assert plan(SHAPE, REQ, short, peers, tight).kind != "local"


def test_max_memory_share_forces_split() -> None:
    local = dev(LOCAL, mem=150 * MiB)
    peers = [dev("a", mem=150 * MiB)]
    assert plan(SHAPE, REQ, local, peers, OPEN).kind == "local"
    half = dataclasses.replace(OPEN, max_memory_share=0.5, prefer_local=True)
    p = plan(SHAPE, REQ, local, peers, half)
    assert p.kind == "split" and tiles(p.stages, 30)


def test_three_stage_split_when_two_do_not_fit() -> None:
    mem = 55 * MiB
    p = plan(SHAPE, REQ, dev(LOCAL, mem=mem), [dev("a", mem=mem), dev("b", mem=mem)], OPEN)
    assert p.kind == "split" and len(p.stages) == 3 and tiles(p.stages, 30)


def test_a_chain_costs_one_hop_between_remote_stages_whose_rtt_is_known() -> None:
    far = 0.020  # origin to each peer; the two peers are close to each other
    b = linked("b", rtt_s=far, peer_rtts=(("c", 0.002),))
    c = linked("c", rtt_s=far)
    stages = [(dev(LOCAL), LayerSpan(0, 10)), (b, LayerSpan(10, 20)), (c, LayerSpan(20, 30))]
    star, chained = predict(SHAPE, REQ, stages), predict(SHAPE, REQ, stages, chain=True)
    hidden = 4 * SHAPE.hidden_size
    # the star: b answers the origin, which calls c (two half RTTs, two transfers); the chain: b to c
    saved = far / 2 + far / 2 + 2 * hidden / b.bandwidth_bps - (0.002 / 2 + hidden / b.bandwidth_bps)
    assert chained.per_token_s == pytest.approx(star.per_token_s - saved)
    assert chained.ttft_s == star.ttft_s  # prefill still goes through the origin
    # c's advert alone says it just as well; the lower of two adverts counts
    c_says = linked("c", rtt_s=far, peer_rtts=(("b", 0.002),))
    c_knows = [stages[0], (linked("b", rtt_s=far), stages[1][1]), (c_says, stages[2][1])]
    assert predict(SHAPE, REQ, c_knows, chain=True).per_token_s == pytest.approx(chained.per_token_s)
    b_says_more = linked("b", rtt_s=far, peer_rtts=(("c", 0.004),))
    both = [stages[0], (b_says_more, stages[1][1]), (c_says, stages[2][1])]
    assert predict(SHAPE, REQ, both, chain=True).per_token_s == pytest.approx(chained.per_token_s)
    unknown = [stages[0], (linked("b", rtt_s=far), stages[1][1]), (c, stages[2][1])]
    assert predict(SHAPE, REQ, unknown, chain=True) == predict(SHAPE, REQ, unknown)
    local_between = [(b, LayerSpan(0, 10)), (dev(LOCAL), LayerSpan(10, 20)), (c, LayerSpan(20, 30))]
    assert predict(SHAPE, REQ, local_between, chain=True) == predict(SHAPE, REQ, local_between)
    tab = [stages[0], stages[1], (dataclasses.replace(c, offload_link=False), stages[2][1])]  # no direct link
    assert predict(SHAPE, REQ, tab, chain=True) == predict(SHAPE, REQ, tab)


def test_the_planner_counts_the_chain_only_when_asked() -> None:
    mem = 55 * MiB  # three stages needed
    peers = [linked("a", mem=mem, rtt_s=0.030, peer_rtts=(("b", 0.001),)), linked("b", mem=mem, rtt_s=0.030)]
    star = plan(SHAPE, REQ, dev(LOCAL, mem=mem), peers, OPEN)
    chained = plan(SHAPE, REQ, dev(LOCAL, mem=mem), peers, OPEN, chain=True)
    assert star.kind == chained.kind == "split" and len(chained.stages) == 3
    assert abs(chained.devices.index("a") - chained.devices.index("b")) == 1  # the two peers side by side
    assert chained.prediction.per_token_s < star.prediction.per_token_s - 0.025


def test_advertised_links_are_bounded_and_junk_is_left_out() -> None:
    links = {"c": 2.5, "d": None, "e": "fast", "f": -1, "g": True, "h": float("nan"), "i": 1e9, "": 3, "j": 0}
    assert advert_links(links) == (("c", 0.0025), ("j", 0.0))
    assert advert_links(["c", 1]) == () and advert_links(None) == ()
    assert len(advert_links({f"p{i}": 1 for i in range(MAX_LINKS + 10)})) == MAX_LINKS
    device = advert_device("b", {"links": {"c": 4}, "speed": {"m": {"decode_tok_s": 50}}}, "m", holds=True,
                           trusted=True, rtt_s=0.01, link="host")
    assert device.peer_rtts == (("c", 0.004),)


def test_equal_speeds_split_balanced() -> None:
    mem = 80 * MiB
    p = plan(SHAPE, REQ, dev(LOCAL, mem=mem), [dev("a", mem=mem)], OPEN)
    sizes = sorted(len(a.span) for a in p.stages)
    assert p.kind == "split" and sizes[1] - sizes[0] <= 12  # head/embedding extras shift a few layers


def test_serve_others_off_peer_never_used() -> None:
    p = plan(SHAPE, REQ, dev(LOCAL, tps=1), [dev("shy", tps=1000, serves_others=False)], OPEN)
    assert p.kind == "local"
    with pytest.raises(NoPlanError, match="none usable"):
        plan(SHAPE, REQ, None, [dev("shy", serves_others=False)], OPEN)


def test_battery_floor() -> None:
    low = dev("low", tps=1000, battery=10.0)
    assert plan(SHAPE, REQ, dev(LOCAL, tps=1), [low], OPEN).kind == "local"
    charging = dataclasses.replace(low, charging=True)
    assert plan(SHAPE, REQ, dev(LOCAL, tps=1), [charging], OPEN).devices == ["low"]
    # a local node below the floor hands work to a peer even when it prefers local and is faster
    tired = dev(LOCAL, tps=1000, battery=5.0)
    pol = dataclasses.replace(OPEN, prefer_local=True)
    assert plan(SHAPE, REQ, tired, [dev("p", tps=10)], pol).devices == ["p"]
    assert plan(SHAPE, REQ, tired, [], pol).devices == [LOCAL]  # ...and runs itself when alone


def test_trusted_only() -> None:
    pol = dataclasses.replace(OPEN, trusted_only_splits=True)
    peers = [dev("untrusted", tps=1000, trusted=False), dev("friend", tps=20)]
    assert plan(SHAPE, REQ, dev(LOCAL, tps=1), peers, pol).devices == ["friend"]
    with pytest.raises(NoPlanError):
        plan(SHAPE, REQ, dev(LOCAL, mem=60 * MiB), [dev("u", mem=60 * MiB, trusted=False)], pol)


def test_exclude_replans_without_the_lost_stage() -> None:
    mem = 80 * MiB
    peers = [dev("a", mem=mem), dev("b", mem=mem)]
    first = plan(SHAPE, REQ, dev(LOCAL, mem=mem), peers, OPEN)
    lost = next(d for d in first.devices if d != LOCAL)
    again = plan(SHAPE, REQ, dev(LOCAL, mem=mem), peers, OPEN, exclude=[lost])
    assert lost not in again.devices and tiles(again.stages, 30)


def test_policy_config_is_accepted() -> None:
    p = plan(SHAPE, REQ, dev(LOCAL), [], PolicyConfig())
    assert p.kind == "local"
    assert p.to_route()["stages"] == [{"peer": LOCAL, "layers": "0:30"}]


def test_queue_depth_slows_a_peer() -> None:
    busy = dev("busy", tps=100, queue_depth=9)
    idle = dev("idle", tps=50)
    assert plan(SHAPE, REQ, dev(LOCAL, tps=1), [busy, idle], OPEN).devices == ["idle"]


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        dev("x", tps=-1)
    with pytest.raises(ValueError):
        Request(prompt_tokens=0, max_tokens=1)
    with pytest.raises(ValueError):
        plan(SHAPE, REQ, dev("not-local"), [], OPEN)


@example(total=10, speeds=[19.0, 1.0, 1.0], caps=[9, 1, 1, 0, 0])  # found by hypothesis in CI
@settings(max_examples=500, deadline=None)
@given(
    total=st.integers(1, 64),
    speeds=st.lists(st.floats(0.1, 1000), min_size=1, max_size=5),
    caps=st.lists(st.integers(0, 64), min_size=5, max_size=5),
)
def test_allocations_are_valid_or_none(total: int, speeds: list[float], caps: list[int]) -> None:
    caps = caps[: len(speeds)]
    feasible = len(speeds) <= total <= sum(caps) and min(caps) >= 1
    for allocate in (allocate_proportional, allocate_fastest_first):
        counts = allocate(total, speeds, caps)
        assert (counts is not None) == feasible
        if counts is not None:
            assert sum(counts) == total
            assert all(1 <= c <= cap for c, cap in zip(counts, caps, strict=True))


device_st = st.builds(
    lambda i, tps, mem, trusted, serves, battery, rtt, loaded: Device(
        id=f"p{i}",
        decode_tps=tps,
        prefill_tps=0,
        free_memory=mem,
        total_memory=mem,
        trusted=trusted,
        serves_others=serves,
        battery=battery,
        rtt_s=rtt,
        loaded=loaded,
    ),
    i=st.integers(0, 1000),
    tps=st.floats(1, 500),
    mem=st.integers(0, 200 * MiB),
    trusted=st.booleans(),
    serves=st.booleans(),
    battery=st.none() | st.floats(0, 100),
    rtt=st.floats(0, 0.1),
    loaded=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    peers=st.lists(device_st, max_size=4, unique_by=lambda d: d.id),
    local_mem=st.integers(0, 200 * MiB),
    local_tps=st.floats(1, 500),
    trusted_only=st.booleans(),
    prefer_local=st.booleans(),
    share=st.floats(0.1, 1.0),
)
def test_any_plan_tiles_fits_and_obeys_policy(
    peers: list[Device],
    local_mem: int,
    local_tps: float,
    trusted_only: bool,
    prefer_local: bool,
    share: float,
) -> None:
    policy = PolicyConfig(True, 20, share, trusted_only, prefer_local)
    local = Device(LOCAL, local_tps, 0, local_mem, local_mem)
    by_id = {d.id: d for d in [local, *peers]}
    try:
        p = plan(SHAPE, REQ, local, peers, policy)
    except NoPlanError:
        return
    assert tiles(p.stages, SHAPE.num_layers)
    assert len(set(p.devices)) == len(p.devices)
    for i, a in enumerate(p.stages):
        d = by_id[a.device]
        need = SHAPE.span_memory(a.span, REQ.context_tokens, REQ.overhead_bytes)
        if p.kind == "offload" and d.loaded:  # its engine has the weights: only the request's KV is new
            need = request_memory(SHAPE, REQ)
        assert need <= d.memory_budget(policy)
        assert i == 0 or a.span.start > 0
        if not d.is_local:
            assert d.serves_others
            assert not d.below_battery_floor(policy)
            if trusted_only:
                assert d.trusted
    assert p.prediction.ttlt_s >= p.prediction.ttft_s >= 0
