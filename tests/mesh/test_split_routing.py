"""Router pieces that need no network: forced routes, speed measurement, advert parsing, offload params, a
remote tokenizer's errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from shoal.mesh.p2p.errors import LinkClosed, MeshError, RemoteError
from shoal.mesh.split import wire
from shoal.mesh.split.offload import params_to_wire
from shoal.mesh.split.offload_frames import token_event as _token_event
from shoal.mesh.split.plan_inputs import ForcedRoute, Speeds, advert_models, advert_number
from shoal.mesh.split.remote_model import RemoteTokenizer
from shoal.mesh.split.router import GREEDY_TOP_K, logits_top_k
from shoal.models.errors import ModelError
from shoal.models.sampling import SamplingParams


def test_forced_route_parses_and_validates() -> None:
    route = ForcedRoute.from_body({"kind": "split", "stages": [{"peer": "local", "layers": "0:15"},
                                                               {"peer": "p2", "layers": "15:"}]})
    assert route is not None
    plan = route.to_plan(30)
    assert plan.kind == "split" and [str(a.span) for a in plan.stages] == ["0:15", "15:30"]
    assert ForcedRoute.from_body({}) is None and ForcedRoute.from_body(None) is None
    assert ForcedRoute.from_body({"kind": "local"}).to_plan(30).devices == ["local"]  # type: ignore[union-attr]
    for bad in ({"kind": "teleport"}, {"kind": "split", "stages": [{"peer": 1}]}, [], {"kind": "offload"}):
        with pytest.raises(ValueError):
            parsed = ForcedRoute.from_body(bad)
            assert parsed is not None
            parsed.to_plan(30)
    with pytest.raises(ValueError):
        ForcedRoute.from_body({"kind": "split", "stages": [{"peer": "a", "layers": "0:40"}]}).to_plan(30)  # type: ignore[union-attr]


def test_speeds_are_a_moving_average() -> None:
    speeds = Speeds()
    assert speeds.get("m") == (0.0, 0.0)
    speeds.observe("m", prompt_tokens=100, ttft_s=0.5, tok_s=10.0)
    assert speeds.get("m") == (10.0, 200.0)
    speeds.observe("m", prompt_tokens=2, ttft_s=0.5, tok_s=20.0)  # too short a prompt to time prefill
    decode, prefill = speeds.get("m")
    assert 10.0 < decode < 20.0 and prefill == 200.0


def test_advert_parsing_tolerates_junk() -> None:
    assert advert_models({"models": ["a", {"id": "b"}, 3, {"name": 4}]}) == {"a", "b"}
    assert advert_models({}) == set()
    assert advert_number("7") == 0.0 and advert_number(float("inf"), 1.0) == 1.0
    assert advert_number(2**2000) == 0.0 and advert_number(2.5) == 2.5


def test_offload_params_and_token_frames() -> None:
    params = SamplingParams(max_tokens=9, temperature=0, stop=("x",))
    wire = params_to_wire(params, max_tokens=4)
    assert wire["max_tokens"] == 4 and wire["stop"] == ["x"]
    assert SamplingParams(**wire).max_tokens == 4
    good = {"token": 5, "text": "hi", "index": 0, "prompt_tokens": 3, "completion_tokens": 1, "finish": None}
    event = _token_event(good, 0)
    assert event is not None and event.token_id == 5 and event.finish_reason is None
    assert _token_event(good, 1) is None  # out of order
    assert _token_event({**good, "token": "5"}, 0) is None
    assert _token_event({**good, "finish": 3}, 0) is None
    stops = ("zz", "x")  # the stop that matched travels as its place in the request's stops
    last = {**good, "finish": "stop", "stop_index": 1}
    found = _token_event(last, 0, stops)
    assert found is not None and found.stop_sequence == "x" and found.finish_reason == "stop"
    assert _token_event(last, 0) is None and _token_event({**last, "stop_index": 2}, 0, stops) is None
    assert _token_event({**last, "stop_index": True}, 0, stops) is None
    assert _token_event({**last, "finish": None}, 0, stops) is None  # only the last token names a stop


def test_the_largest_offload_open_fits_its_frame() -> None:
    """The longest prompt and grammar a request may carry, with every stop string, fit `offload.open`."""
    from shoal.mesh.p2p.protocol import ControlFrame, encode_control
    from shoal.mesh.split import wire as split_wire
    from shoal.mesh.split.offload import MAX_PROMPT_IDS
    from shoal.models.grammar import MAX_GRAMMAR_CHARS, Constraint

    worst = Constraint("lark", '"' * MAX_GRAMMAR_CHARS)  # each quote doubles when escaped
    params = SamplingParams(max_tokens=8192, temperature=0.5, seed=2**63 - 1, constraint=worst,
                            stop=tuple("\U0001F600" * 256 for _ in range(8)), logprobs=20)
    body = {"rid": 2**32 - 1, "model": "m" * 200, "prompt_ids": [99_999] * MAX_PROMPT_IDS,
            "params": params_to_wire(params)}
    assert encode_control(ControlFrame(split_wire.OFFLOAD_OPEN, body, id=2**32 - 1))


def test_logits_top_k_by_sampling_params() -> None:
    assert logits_top_k(SamplingParams(temperature=0), 256) == GREEDY_TOP_K  # argmax: a one-packet reply
    assert logits_top_k(SamplingParams(temperature=0), 4) == GREEDY_TOP_K
    assert logits_top_k(SamplingParams(temperature=0, repetition_penalty=1.2), 256) == 256
    assert logits_top_k(SamplingParams(temperature=0, presence_penalty=-1.0), 256) == 256
    assert logits_top_k(SamplingParams(temperature=0.7), 256) == 0  # no top-k: every logit
    assert logits_top_k(SamplingParams(temperature=0.7, top_k=40), 256) == 256
    assert logits_top_k(SamplingParams(temperature=0.7, top_k=400), 256) == 0


class _FailingMesh:
    """A mesh whose every request fails with `error`."""

    def __init__(self, error: MeshError) -> None:
        self.error = error

    async def request(self, peer_id: str, frame_type: str, body: dict[str, Any],
                      timeout_s: float | None = None) -> dict[str, Any]:
        raise self.error


async def test_remote_tokenizer_errors() -> None:
    """A peer's bad_request refusal is the caller's ValueError (its message kept); other failures are
    ModelError."""
    loop = asyncio.get_running_loop()
    refused = RemoteTokenizer(_FailingMesh(RemoteError(wire.BAD_REQUEST, "messages[0] has no content")),  # type: ignore[arg-type]
                              loop, "peer", "m", 100)
    with pytest.raises(ValueError, match=r"^messages\[0\] has no content$"):
        await asyncio.to_thread(refused.encode, "hi")
    for error in (RemoteError("busy", "try later"), LinkClosed("link closed")):
        failing = RemoteTokenizer(_FailingMesh(error), loop, "peer", "m", 100)  # type: ignore[arg-type]
        with pytest.raises(ModelError, match="tokenizing on peer failed"):
            await asyncio.to_thread(failing.encode, "hi")


async def test_embeddings_go_to_the_best_usable_holder_never_a_browser() -> None:
    from shoal.mesh.split.config import SplitConfig
    from shoal.mesh.split.cost_model import Device
    from shoal.mesh.split.policy import PolicyConfig
    from shoal.mesh.split.remote_embed import pick_embedder

    class Linked:  # the one member of MeshHandle pick_embedder reads
        def __init__(self, adverts: dict[str, dict[str, str]]) -> None:
            self.peers = [type("P", (), {"peer_id": k, "advert": v})() for k, v in adverts.items()]

        def connected_peers(self) -> list[Any]:
            return self.peers

    gb = 1 << 30
    devices = [Device("fast-browser", 50.0, 0.0, gb, gb), Device("slow", 5.0, 0.0, gb, gb),
               Device("fast-untrusted", 40.0, 0.0, gb, gb, trusted=False),
               Device("no-model", 90.0, 0.0, gb, gb, holds_model=False, fetch_bps=1e6),
               Device("refuses", 90.0, 0.0, gb, gb, serves_others=False),
               Device("flat", 90.0, 0.0, gb, gb, battery=3.0), Device("ok", 20.0, 0.0, gb, gb)]
    mesh = Linked({"fast-browser": {"kind": "browser"}, "ok": {"kind": "node"}})
    trusting = PolicyConfig(trusted_only_splits=False)
    picked = pick_embedder(mesh, "m", 576, devices, trusting, SplitConfig())  # type: ignore[arg-type]
    assert picked is not None and picked.peer_id == "fast-untrusted" and picked.dimensions == 576
    careful = PolicyConfig(trusted_only_splits=True)
    assert pick_embedder(mesh, "m", 576, devices, careful, SplitConfig()).peer_id == "ok"  # type: ignore[arg-type,union-attr]
    assert pick_embedder(mesh, "m", 576, devices[:1], trusting, SplitConfig()) is None  # type: ignore[arg-type]
