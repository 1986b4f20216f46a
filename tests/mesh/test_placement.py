"""Placement that pays off (pure planner): unmeasured speeds, load, the relays' CPU and the hysteresis margin;
a burst of requests planned one after another as the router does; the speed probe's numbers as the router
keeps and advertises them; the `[split]` placement knobs."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.cost_model import (
    MAX_RELAY_SHARE,
    OFFLOAD_LINK_TOKEN_S,
    OFFLOAD_TOKEN_S,
    RELAY_LINK_TOKEN_S,
    RELAY_TOKEN_S,
    Device,
    predict_offload,
)
from shoal.mesh.split.plan_inputs import (
    DEFAULT_TPS,
    MAX_BATCH_COST,
    MAX_BATCH_STEPS,
    MAX_QUEUE,
    Speeds,
    advert_device,
    advert_steps,
)
from shoal.mesh.split.scheduler import LOCAL, assume_unmeasured, plan, relay_share
from shoal.mesh.split.speed_probe import batch_steps

from tests.mesh.test_scheduler import OPEN, REQ, SHAPE, dev


def test_an_unmeasured_peer_is_never_taken_for_faster() -> None:
    local = dev(LOCAL, tps=10)
    guess = dev("guess", tps=1000, measured=False)  # e.g. the default for a peer that advertises no speed
    p = plan(SHAPE, REQ, local, [guess], OPEN)
    assert p.kind == "local", p
    _, [assumed] = assume_unmeasured(local, [guess])
    assert assumed.decode_tps == 10 and assumed.prefill_tps == local.prefill_tps
    slow_guess = dev("slow", tps=2, measured=False)  # an unmeasured peer slower than us keeps its number
    assert assume_unmeasured(local, [slow_guess])[1][0].decode_tps == 2
    # it still serves when it must: the local node cannot hold the model
    p = plan(SHAPE, REQ, dev(LOCAL, tps=10, mem=1), [guess], OPEN)
    assert p.kind == "offload" and p.devices == ["guess"]


def test_an_unmeasured_local_node_is_taken_as_fast_as_the_fastest_measured_peer() -> None:
    local = dev(LOCAL, tps=10, measured=False)  # e.g. the default while the speed probe runs
    p = plan(SHAPE, REQ, local, [dev("fast", tps=1000), dev("mid", tps=100)], OPEN)
    assert p.kind == "local", p
    assumed, _ = assume_unmeasured(local, [dev("fast", tps=1000)])
    assert assumed is not None and assumed.decode_tps == 1000


def test_a_slow_node_offloads_to_a_fast_one_past_the_margin() -> None:
    p = plan(SHAPE, REQ, dev(LOCAL, tps=4), [dev("fast", tps=20), dev("mid", tps=8)], OPEN, margin=0.2)
    assert p.kind == "offload" and p.devices == ["fast"]
    assert p.prediction.ttlt_s < 0.8 * plan(SHAPE, REQ, dev(LOCAL, tps=4), [], OPEN).prediction.ttlt_s


def test_the_margin_keeps_small_gains_local_and_is_hysteresis() -> None:
    local, peer = dev(LOCAL, tps=100), dev("peer", tps=135)  # ~10 % sooner there, its token stream included
    best = plan(SHAPE, REQ, local, [peer], OPEN)
    assert best.kind == "offload"  # no margin: the least ttlt wins
    alone = plan(SHAPE, REQ, local, [], OPEN)
    assert 0.8 < best.prediction.ttlt_s / alone.prediction.ttlt_s < 0.95
    kept = plan(SHAPE, REQ, local, [peer], OPEN, margin=0.2)  # leaving needs 20 %
    assert kept.kind == "local" and "not 20% sooner" in kept.notes[0], kept
    assert plan(SHAPE, REQ, local, [peer], OPEN, margin=0.05).kind == "offload"  # staying needs 5 %
    # a request that asks for a route or prefers a peer gets it without a margin
    assert plan(SHAPE, REQ, local, [peer], OPEN, margin=0.2, kinds=("offload",)).kind == "offload"
    assert plan(SHAPE, REQ, local, [peer], OPEN, margin=0.2, prefer=["peer"]).kind == "offload"
    with pytest.raises(ValueError):
        plan(SHAPE, REQ, local, [peer], OPEN, margin=1.0)


def test_a_busy_node_spreads_to_an_idle_equal_peer() -> None:
    twin = dev("twin", rtt_s=0.002)
    assert plan(SHAPE, REQ, dev(LOCAL), [twin], OPEN, margin=0.2).kind == "local"
    busy = dev(LOCAL, queue_depth=1)  # one request running here: a second one takes twice as long
    assert plan(SHAPE, REQ, busy, [twin], OPEN, margin=0.2).devices == ["twin"]
    # batching that makes a second request nearly free keeps it here...
    cheap = dev(LOCAL, queue_depth=1, batch_cost=0.1)
    assert plan(SHAPE, REQ, cheap, [twin], OPEN, margin=0.2).kind == "local"
    # ...until enough of them run
    assert plan(SHAPE, REQ, dev(LOCAL, queue_depth=4, batch_cost=0.1), [twin], OPEN, margin=0.2).devices == \
        ["twin"]
    # a busy peer is worth less than an idle one; equally busy: local (no link to pay)
    p = plan(SHAPE, REQ, busy, [dev("twin", queue_depth=1), dev("idle", tps=90)], OPEN, margin=0.2)
    assert p.devices == ["idle"]
    assert plan(SHAPE, REQ, busy, [dev("twin", queue_depth=1)], OPEN).kind == "local"


def burst(local: Device, peer: Device, requests: int) -> list[str]:
    """Where each of `requests` arriving at once at `local` runs, planned one after another as the router
    does: each placed request counts on its device's queue (`Router.placed`), each offload running adds its
    relay to this node's CPU (`relay_share`), and the margin is 20 % to leave, 5 % once the last plan left."""
    placed: Counter[str] = Counter()
    away = False
    where = []
    for _ in range(requests):
        there = dataclasses.replace(peer, queue_depth=peer.queue_depth + placed[peer.id])
        here = dataclasses.replace(local, queue_depth=placed[LOCAL],
                                   relay_share=relay_share([(placed[peer.id], there)]))
        chosen = plan(SHAPE, REQ, here, [there], OPEN, margin=0.05 if away else 0.2)
        away = chosen.kind != "local"
        placed[chosen.devices[0]] += 1
        where.append(chosen.devices[0])
    return where


def test_a_burst_spreads_only_where_spreading_pays() -> None:
    # no gain from batching (the NumPy reference: a second request doubles the step): half go to the idle twin
    assert Counter(burst(dev(LOCAL), dev("twin"), 4)) == {LOCAL: 2, "twin": 2}
    # batching nearly free here (a batched step reads the weights once): the whole burst stays, since moving a
    # request saves this node almost nothing while its token stream and relay cost both ends
    assert burst(dev(LOCAL, batch_cost=0.05), dev("twin", batch_cost=0.05), 4) == [LOCAL] * 4
    # a twin already as busy as this node will be takes nothing either
    assert burst(dev(LOCAL), dev("twin", queue_depth=4), 4) == [LOCAL] * 4


def test_a_measured_batch_curve_keeps_a_burst_where_batching_turns_free() -> None:
    # the NumPy reference as its probe measures it: a second request doubles the step, a third and fourth
    # add almost nothing (a matrix-vector product becomes a matrix product, then stays one)
    numpy_like = {"batch_cost": 1.0, "batch_steps": (1.0, 2.0, 2.05, 2.1)}
    here = dev(LOCAL, **numpy_like)
    assert [dataclasses.replace(here, queue_depth=q).load_factor for q in range(5)] == \
        pytest.approx([1.0, 2.0, 2.05, 2.1, 3.1])  # past the table: batch_cost a request
    # a twin that measured slower (its core shared with other work): the pair's cost alone, taken as a line,
    # sends the third and fourth there, though they cost this node almost nothing
    slower = dev("twin", tps=55, batch_cost=1.0)
    assert burst(dev(LOCAL, batch_cost=1.0), slower, 4).count(LOCAL) < 4
    assert burst(here, dataclasses.replace(slower, batch_steps=(1.0, 2.0, 2.05, 2.1)), 4) == [LOCAL] * 4
    # an equal idle twin still takes the second (it finishes twice as soon there), not the rest
    assert burst(here, dev("twin", **numpy_like), 4) == [LOCAL, "twin", LOCAL, LOCAL]


def test_batch_steps_are_read_defensively() -> None:
    assert advert_steps([1, 2.0, 2.1, 2.2]) == (1.0, 2.0, 2.1, 2.2)
    assert advert_steps([0.5, 0.9, 3.0]) == (1.0, 1.0, 3.0)  # never below one alone or the size before
    assert advert_steps([1, 99]) == (1.0, 1 + MAX_BATCH_COST)
    for junk in (None, "1,2", [], [1], [1, "2"], [1, float("nan")], [1, True], [1.0] * (MAX_BATCH_STEPS + 1)):
        assert advert_steps(junk) == (), junk
    peer = advert_device("p", {"speed": {"m": {"decode_tok_s": 10, "batch_steps": [1, 1.2, 1.3]}}}, "m",
                         holds=True, trusted=True, rtt_s=0.001, link="host")
    assert peer.batch_steps == (1.0, 1.2, 1.3)
    speeds = Speeds()
    speeds.probed("m", 10.0, 100.0, 0.5, (1.0, 1.5, 1.6, 1.7))
    assert speeds.batch_steps("m") == (1.0, 1.5, 1.6, 1.7) and speeds.batch_steps("other") == ()
    assert batch_steps(2.0, 2.1, 4) == (1.0, 2.0, 2.05, 2.1) and batch_steps(1.4, None, 4) == (1.0, 1.4)
    assert batch_steps(0.8, 0.5, 3) == (1.0, 1.0, 1.0)  # a noisy probe: never faster batched than alone
    with pytest.raises(ValueError):
        dev(LOCAL, batch_steps=(1.0, float("inf")))


def test_relays_take_the_origins_cpu() -> None:
    peer = dev("peer", tps=100)
    assert relay_share([]) == 0 and relay_share([(0, peer)]) == 0
    assert relay_share([(2, peer)]) == pytest.approx(2 * RELAY_TOKEN_S * 100)
    busy_peer = dataclasses.replace(peer, queue_depth=1)  # its streams run at half speed: half the relay
    assert relay_share([(1, busy_peer)]) == pytest.approx(RELAY_TOKEN_S * 50)
    assert relay_share([(10_000, peer)]) == MAX_RELAY_SHARE
    relaying = dev(LOCAL, queue_depth=1, batch_cost=0.5, relay_share=0.2)
    assert relaying.load_factor == pytest.approx(1.5 / 0.8)
    # a node relaying fast streams computes slower, so a request it could batch cheaply goes to an idle peer
    here = dev(LOCAL, queue_depth=1, batch_cost=0.3)
    assert plan(SHAPE, REQ, here, [dev("idle")], OPEN, margin=0.2).kind == "local"
    fast = dev("fast", tps=400)
    loaded = dataclasses.replace(here, relay_share=relay_share([(2, fast)]))
    assert plan(SHAPE, REQ, loaded, [dev("idle")], OPEN, margin=0.2).devices == ["idle"]
    for bad in (-0.1, MAX_RELAY_SHARE + 0.01, float("nan")):
        with pytest.raises(ValueError):
            dev(LOCAL, relay_share=bad)


def test_a_direct_offload_link_costs_less_per_token_at_both_ends() -> None:
    """A peer whose tokens would come over a direct link (`Device.offload_link`): its stream's per-token cost
    and the origin's relay CPU are the link's (measured in bench/offload_link.py), not the data channel's."""
    assert OFFLOAD_LINK_TOKEN_S < OFFLOAD_TOKEN_S and RELAY_LINK_TOKEN_S < RELAY_TOKEN_S
    channel, linked = dev("peer", tps=100), dev("peer", tps=100, offload_link=True)
    saved = predict_offload(SHAPE, REQ, channel).per_token_s - predict_offload(SHAPE, REQ, linked).per_token_s
    assert saved == pytest.approx(OFFLOAD_TOKEN_S - OFFLOAD_LINK_TOKEN_S)
    assert relay_share([(2, linked)]) == pytest.approx(2 * RELAY_LINK_TOKEN_S * 100)
    both = relay_share([(1, channel), (1, linked)])
    assert both == pytest.approx((RELAY_TOKEN_S + RELAY_LINK_TOKEN_S) * 100)


def test_a_peer_just_past_the_margin_over_a_link_is_not_over_the_channel() -> None:
    """At 100 tok/s here and 132 there, the data channel's ~1 ms a token keeps the offload within the 20 %
    margin (local), the link's does not (offload); and a node relaying linked streams keeps more of its
    CPU."""
    local = dev(LOCAL)
    assert plan(SHAPE, REQ, local, [dev("peer", tps=132)], OPEN, margin=0.2).kind == "local"
    assert plan(SHAPE, REQ, local, [dev("peer", tps=132, offload_link=True)], OPEN,
                margin=0.2).devices == ["peer"]
    fast, fast_linked = dev("fast", tps=400), dev("fast", tps=400, offload_link=True)
    here = dev(LOCAL, queue_depth=1, batch_cost=0.1)  # a second request here is nearly free...
    over_channel = dataclasses.replace(here, relay_share=relay_share([(1, fast)]))  # ...but for the relay
    over_link = dataclasses.replace(here, relay_share=relay_share([(1, fast_linked)]))
    assert over_link.load_factor < over_channel.load_factor
    assert plan(SHAPE, REQ, over_channel, [dev("idle")], OPEN, margin=0.2).devices == ["idle"]
    assert plan(SHAPE, REQ, over_link, [dev("idle")], OPEN, margin=0.2).kind == "local"


def test_an_advert_device_carries_whether_its_offload_would_use_a_link() -> None:
    advert = {"speed": {"m": {"decode_tok_s": 50.0}}, "split": {"serve_others": True}}
    plain = advert_device("p", advert, "m", holds=True, trusted=True, rtt_s=0.001, link="host")
    linked = advert_device("p", advert, "m", holds=True, trusted=True, rtt_s=0.001, link="host",
                           offload_link=True)
    assert not plain.offload_link and linked.offload_link


def test_load_factor_and_batch_cost_bounds() -> None:
    assert dev(LOCAL, queue_depth=3, batch_cost=0.5).load_factor == 2.5
    assert dev(LOCAL).seconds_per_token() == pytest.approx(1 / 100)
    with pytest.raises(ValueError):
        dev(LOCAL, batch_cost=-1.0)
    with pytest.raises(ValueError):
        dev(LOCAL, batch_cost=float("nan"))


def test_speeds_keep_the_probe_then_the_requests() -> None:
    speeds = Speeds()
    assert not speeds.measured("m") and speeds.batch_cost("m") == 1.0
    speeds.probed("m", decode_tok_s=20.0, prefill_tok_s=250.0, batch_cost=0.4)
    assert speeds.measured("m") and speeds.get("m") == (20.0, 250.0) and speeds.batch_cost("m") == 0.4
    assert speeds.by_model["m"]["source"] == "probe"
    speeds.observe("m", prompt_tokens=100, ttft_s=0.5, tok_s=10.0)
    decode, prefill = speeds.get("m")
    assert 10 < decode < 20 and 200 < prefill < 250 and speeds.by_model["m"]["source"] == "requests"
    speeds.probed("m", decode_tok_s=30.0, prefill_tok_s=0.0, batch_cost=None)  # a reload: probed again
    assert speeds.get("m")[0] == 30.0 and speeds.batch_cost("m") == 0.4


def test_split_config_placement_knobs() -> None:
    config = SplitConfig()
    assert config.speed_probe and config.offload_gain_percent == 20 and config.stay_gain_percent == 5
    for bad in ({"offload_gain_percent": 95}, {"stay_gain_percent": -1}, {"speed_probe_tokens": 1},
                {"offload_gain_percent": 5, "stay_gain_percent": 10}, {"speed_probe": 1}):
        with pytest.raises(ValueError):
            SplitConfig(**bad)


def test_a_peer_device_from_its_advert() -> None:
    advert = {"speed": {"m": {"decode_tok_s": 40.0, "prefill_tok_s": 400.0, "batch_cost": 0.5,
                              "source": "probe"}},
              "queue_depth": 1, "split": {"serve_others": True, "memory_budget": 2 * 2**30}}
    d = advert_device("p1", advert, "m", holds=True, trusted=False, rtt_s=0.002, link="host")
    assert (d.decode_tps, d.prefill_tps, d.batch_cost, d.queue_depth) == (40.0, 400.0, 0.5, 1) and d.measured
    assert d.serves_others and d.free_memory == 2 * 2**30 and not d.trusted
    # requests this node just placed there count until the advert catches up
    assert advert_device("p1", advert, "m", holds=True, trusted=True, rtt_s=0.002, link="host",
                         placed=3).queue_depth == 3
    # no speed for this model: unmeasured, at the default; junk reads as absent
    junk = {"speed": {"m": {"decode_tok_s": "fast", "batch_cost": 99.0}}, "queue_depth": 2**80,
            "split": "yes"}
    d = advert_device("p2", junk, "m", holds=True, trusted=True, rtt_s=0.001, link="host")
    assert not d.measured and d.decode_tps == DEFAULT_TPS and not d.serves_others
    assert d.batch_cost == MAX_BATCH_COST and d.queue_depth == MAX_QUEUE
    assert not advert_device("p3", {}, "m", holds=True, trusted=True, rtt_s=0.001, link="host").measured


def test_a_peer_battery_is_read_as_gossip_sends_it() -> None:
    """Gossip (native nodes and the browser tab alike) sends `battery` as a percent, `plugged` beside it."""
    from shoal.mesh.split.policy import PolicyConfig

    policy = PolicyConfig(battery_floor=20)
    low = advert_device("p1", {"battery": 12.5, "plugged": False}, "m", holds=True, trusted=True,
                        rtt_s=0.001, link="host")
    assert low.battery == 12.5 and not low.charging and low.below_battery_floor(policy)
    charging = advert_device("p1", {"battery": 12.5, "plugged": True}, "m", holds=True, trusted=True,
                             rtt_s=0.001, link="host")
    assert charging.charging and not charging.below_battery_floor(policy)
    for mains in ({}, {"battery": None}, {"battery": "low"}, {"battery": -3}):
        d = advert_device("p1", mains, "m", holds=True, trusted=True, rtt_s=0.001, link="host")
        assert d.battery is None and not d.below_battery_floor(policy)
    assert advert_device("p1", {"battery": 250}, "m", holds=True, trusted=True, rtt_s=0.001,
                         link="host").battery == 100.0
