"""A request's own routing wishes: the `shoal` body field and `x-shoal-route` header (parsing, 400s naming the
field), and the scheduler planning within them (kinds, prefer, avoid via exclude)."""

from __future__ import annotations

import dataclasses

import pytest
from shoal.mesh.api.errors import ApiError
from shoal.mesh.api.openai_schema import parse_completion_request, route_choice
from shoal.mesh.p2p.errors import RemoteError
from shoal.mesh.route import RouteChoice
from shoal.mesh.split.peer_failures import peer_failure
from shoal.mesh.split.remote_stage import StageLost
from shoal.mesh.split.scheduler import LOCAL, NoPlanError, plan

from tests.mesh.test_scheduler import OPEN, REQ, SHAPE, dev

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_body_and_header_parse() -> None:
    assert parse_completion_request(CHAT, "chat", 100).route == RouteChoice()
    req = parse_completion_request({**CHAT, "shoal": {"route": "offload", "prefer": ["b"], "avoid": ["c"]}},
                                   "chat", 100, "local")
    assert req.route == RouteChoice("offload", ("b",), ("c",))  # the body's route wins over the header
    assert parse_completion_request(CHAT, "chat", 100, " Split ").route.mode == "split"
    assert route_choice({"avoid": ["x"]}, "local") == RouteChoice("local", (), ("x",))


@pytest.mark.parametrize(("shoal", "header", "param"), [
    ({"route": "anywhere"}, None, "shoal.route"),
    ({"route": 3}, None, "shoal.route"),
    ({"prefer": "b"}, None, "shoal.prefer"),
    ({"avoid": [""]}, None, "shoal.avoid"),
    ({"avoid": ["p"] * 17}, None, "shoal.avoid"),
    ({"routes": "local"}, None, "shoal.routes"),
    ("local", None, "shoal"),
    (None, "sideways", "x-shoal-route"),
])
def test_bad_route_fields_name_the_field(shoal, header, param) -> None:
    body = dict(CHAT) if shoal is None else {**CHAT, "shoal": shoal}
    with pytest.raises(ApiError) as caught:
        parse_completion_request(body, "chat", 100, header)
    assert caught.value.status == 400 and caught.value.param == param


def test_plan_within_the_requested_kind() -> None:
    local = dev(LOCAL, holds_model=True)
    fast, slow = dev("fast", 300, holds_model=True, serves_others=True), dev("slow", 50, holds_model=True,
                                                                             serves_others=True)
    keep_local = dataclasses.replace(OPEN, prefer_local=True)
    assert plan(SHAPE, REQ, local, [fast, slow], keep_local).kind == "local"
    offload = plan(SHAPE, REQ, local, [fast, slow], keep_local, kinds=("offload",))
    assert offload.kind == "offload" and offload.devices == ["fast"]
    preferred = plan(SHAPE, REQ, local, [fast, slow], keep_local, kinds=("offload",), prefer=("slow",))
    assert preferred.devices == ["slow"]
    avoided = plan(SHAPE, REQ, local, [fast, slow], keep_local, kinds=("offload",), exclude=("fast",))
    assert avoided.devices == ["slow"]
    split = plan(SHAPE, REQ, local, [fast, slow], keep_local, kinds=("split",), prefer=("slow",))
    assert split.kind == "split" and set(split.devices) == {LOCAL, "slow"}
    assert plan(SHAPE, REQ, local, [fast], OPEN, kinds=("local",)).kind == "local"  # even if slower
    with pytest.raises(NoPlanError, match="no peer can take"):
        plan(SHAPE, REQ, local, [fast, slow], keep_local, kinds=("offload",), exclude=("fast", "slow"))
    refusing = dataclasses.replace(fast, serves_others=False)
    with pytest.raises(NoPlanError):
        plan(SHAPE, REQ, local, [refusing], keep_local, kinds=("offload",))


def test_peer_failures_become_coded_errors() -> None:
    refused = peer_failure(RemoteError("refused", "serve_others is off"), "pb")
    assert (refused.status, refused.code) == (503, "peer_refused") and "serve_others" in refused.message
    over = peer_failure(RemoteError("quota", "peer pa used 9 of its 5 tokens; retry in 120 s"), "pc")
    assert (over.status, over.code, over.retry_after_s) == (429, "peer_quota", 120.0)
    assert peer_failure(StageLost("pc", "no answer within 5 s")).code == "peer_unreachable"
    assert peer_failure(RemoteError("bad_request", "ids"), "pb").status == 400
    assert peer_failure(RemoteError("internal", "boom"), "pb").code == "peer_unreachable"
