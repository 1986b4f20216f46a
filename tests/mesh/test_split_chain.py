"""Chains (`split.stage_chain`, docs/split.md *A chain instead of the star*): real stage hosts (NumPy stages)
with real tensor link servers on 127.0.0.1; the stage hosts link to each other as nodes do. A split whose
remote stages pass decode steps on equals one stage token for token, and the steps really skip the origin;
a stage that cannot reach the next leaves its steps to the origin; a lost stage or link mid-chain is
re-planned with the no-fault tokens; frames that break the chain's rules are refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from shoal.mesh.split import arrival, wire
from shoal.mesh.split import tensor_link as tl
from shoal.mesh.split import tensor_link_server as tls
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.hosted import HostError
from shoal.mesh.split.pipeline import SplitPipeline
from shoal.mesh.split.remote_stage import RemoteStage
from shoal.mesh.split.stage_host import StageHost
from shoal.models.span import LayerSpan

from tests.mesh.tensor_frames import error_code, reply_fields
from tests.mesh.test_split_inprocess import MODEL, PeerLink, blocking, factory, gate_open, greedy
from tests.mesh.test_tensor_link import DirectPeerLink
from tests.models.shared_model import chat_ids, gguf_model, reference_stage

PROMPT = "What is the capital of France?"
TOKENS = 6


@pytest.fixture(scope="module")
def expected() -> list[int]:
    return greedy(reference_stage(0, 30), chat_ids(PROMPT), TOKENS, 991_001)


class Mesh:
    """Stage hosts b, c, d listening for direct links; `a` is reached over the data channel only. Each host
    links to the next stage of a chain as a node does (a grant from the next host's server, then the
    handshake), unless `unreachable` names that pair."""

    def __init__(self, native_lane: Callable[[], ModuleType | None] = lambda: None) -> None:
        self.unreachable: set[tuple[str, str]] = set()
        self.native = native_lane() is not None
        self.hosts = {name: StageHost(factory, gate_open, connect_next=self._connector(name),
                                      native_lane=native_lane) for name in "abcd"}
        self.servers = {name: tls.TensorLinkServer(self.hosts[name].serve_link) for name in "bcd"}
        for server in self.servers.values():
            server.start("127.0.0.1")
        self.links: dict[str, Any] = {"a": PeerLink(self.hosts["a"], "a")}
        for name in "bcd":
            self.links[name] = DirectPeerLink(self.hosts[name], name, self.servers[name])

    def _connector(self, me: str):
        async def connect(peer: str) -> tl.TensorLinkClient:
            if (me, peer) in self.unreachable or peer not in self.servers:
                raise tl.LinkError(f"{peer} cannot be reached from {me}")
            return await blocking(tl.TensorLinkClient.connect, "127.0.0.1", self.servers[peer].grant(me))
        return connect

    def stages(self, layout: list[tuple[str, int, int]]) -> list[RemoteStage]:
        """The origin uses the native step lane where the stage hosts do."""
        loop, config = asyncio.get_running_loop(), gguf_model().config
        settings = SplitConfig(native_lane=self.native)
        return [RemoteStage(self.links[name], loop, MODEL, config, LayerSpan(start, stop), direct=name != "a",
                            settings=settings) for name, start, stop in layout]

    async def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        for host in self.hosts.values():
            await host.stop()


@pytest.fixture
async def mesh(native_lane):
    """With and without the native step lane."""
    built = Mesh(native_lane)
    try:
        yield built
    finally:
        await built.close()


THREE = [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


@pytest.mark.parametrize("by_argmax", [False, True])
async def test_a_chain_equals_one_stage_and_skips_the_origin(mesh: Mesh, expected: list[int],
                                                             by_argmax: bool, monkeypatch) -> None:
    answered: list[int] = []
    read_answer = tl.Sealer.answer_native

    def counted(*args: Any) -> int | None:
        got = read_answer(*args)
        if got is not None:
            answered.append(got >> 32)
        return got

    monkeypatch.setattr(tl.Sealer, "answer_native", counted)
    stages = mesh.stages(THREE)
    pipeline = SplitPipeline(gguf_model().config, stages, lambda excluded: [], chain=True)
    try:
        assert await blocking(greedy, pipeline, chat_ids(PROMPT), TOKENS, 5, by_argmax) == expected
        calls = {t["peer"]: t["calls"] for t in pipeline.timings()}
        # b was called by the origin for the prefill only; every decode step came back from c
        assert calls == {"a": TOKENS, "b": 1, "c": TOKENS}
        assert mesh.hosts["b"].calls == TOKENS and mesh.hosts["c"].calls == TOKENS
        # each stage's first decode step arms its lane; c answers natively when the origin wants the argmax
        lane_steps = TOKENS - 2 if mesh.native else 0
        assert mesh.hosts["b"].lane_steps == lane_steps
        assert mesh.hosts["c"].lane_steps == (lane_steps if by_argmax else 0)
        # and the origin reads every greedy step's answer natively, from the first
        assert answered == (expected[1:] if mesh.native and by_argmax else [])
    finally:
        await blocking(pipeline.close)


async def test_a_chain_step_polls_around_its_beat_and_changes_no_token(mesh: Mesh, expected: list[int],
                                                                       monkeypatch) -> None:
    """With a poll budget (`[split] link_spin_us`) the origin's wait for a chain's answer polls every link
    around when the answer is due (`split.arrival`), as a single stage's call does."""
    monkeypatch.setattr(arrival, "MAX_GAP_S", 60.0)  # a loaded machine's slow NumPy steps are a beat too
    polls: list[bool] = []

    def counted(*args: Any) -> bool:
        polls.append(arrival.wait_readable(*args))
        return polls[-1]

    monkeypatch.setattr(tl, "wait_readable", counted)
    loop, config = asyncio.get_running_loop(), gguf_model().config
    settings = SplitConfig(link_spin_us=400)
    stages = [RemoteStage(mesh.links[name], loop, MODEL, config, LayerSpan(start, stop), direct=name != "a",
                          settings=settings) for name, start, stop in THREE]
    tokens = 12
    want = greedy(reference_stage(0, 30), chat_ids(PROMPT), tokens, 991_002)
    pipeline = SplitPipeline(config, stages, lambda excluded: [], chain=True)
    try:
        assert await blocking(greedy, pipeline, chat_ids(PROMPT), tokens, 11) == want
        assert {t["peer"]: t["chained"] for t in pipeline.timings()} == {"a": 0, "b": 0, "c": tokens - 1}
        assert len(polls) == tokens - 1 - arrival.MIN_GAPS  # from the fifth chained step on
    finally:
        await blocking(pipeline.close)


async def test_a_four_stage_chain_equals_one_stage(mesh: Mesh, expected: list[int]) -> None:
    stages = mesh.stages([("a", 0, 8), ("b", 8, 16), ("c", 16, 23), ("d", 23, 30)])
    pipeline = SplitPipeline(gguf_model().config, stages, lambda excluded: [], chain=True)
    try:
        assert await blocking(greedy, pipeline, chat_ids(PROMPT), TOKENS, 6) == expected
        calls = {t["peer"]: t["calls"] for t in pipeline.timings()}
        assert calls == {"a": TOKENS, "b": 1, "c": 1, "d": TOKENS}
    finally:
        await blocking(pipeline.close)


async def test_without_chain_or_a_route_between_stages_steps_go_through_the_origin(
        mesh: Mesh, expected: list[int]) -> None:
    mesh.unreachable.add(("b", "c"))
    for chain in (True, False):
        pipeline = SplitPipeline(gguf_model().config, mesh.stages(THREE), lambda excluded: [], chain=chain)
        try:
            assert await blocking(greedy, pipeline, chat_ids(PROMPT), TOKENS, 7 + chain) == expected
            assert {t["peer"]: t["calls"] for t in pipeline.timings()} == {"a": TOKENS, "b": TOKENS,
                                                                           "c": TOKENS}
        finally:
            await blocking(pipeline.close)


async def test_a_chain_link_closed_while_idle_is_opened_again(mesh: Mesh, expected: list[int]) -> None:
    """c drops b's link between two requests (say the b–c mesh link flapped): b's next `stage.open` notices
    (nothing ever comes back on that link, so a readable socket is a closed one) and links to c again, instead
    of sending the next step into the void."""
    for request in range(2):
        pipeline = SplitPipeline(gguf_model().config, mesh.stages(THREE), lambda excluded: [], chain=True)
        try:
            assert await blocking(greedy, pipeline, chat_ids(PROMPT), TOKENS, 20 + request) == expected
            assert {t["peer"]: t["calls"] for t in pipeline.timings()} == {"a": TOKENS, "b": 1, "c": TOKENS}
            assert pipeline.replans == []
        finally:
            await blocking(pipeline.close)
        mesh.servers["c"].drop_peer("b")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("cut", ["c", "b", "b->c"])
async def test_a_stage_or_link_lost_mid_chain_is_replanned_with_the_same_tokens(
        mesh: Mesh, expected: list[int], cut: str, swap: bool) -> None:
    """c's node goes (its links close), b's node goes, or only b's link to c breaks (c stays): the chain's
    step fails and the tokens are the no-fault ones. Without `replace` the chain is re-planned without the
    stage named; with it (`swap`), the origin's own stage takes the lost span and the other stages are kept
    (their sequences replayed), with no re-plan."""
    loop, config = asyncio.get_running_loop(), gguf_model().config
    lost = "c" if cut in ("c", "b->c") else "b"
    records = 0
    original = StageHost._answer_link

    def cut_in_step_three(self: StageHost, link: tls.ServerLink) -> bool:
        """Before b reads its fourth record (the prefill, then the chain's steps: the third step), by
        either path (`_link_frame`, or the native step lane's)."""
        nonlocal records
        if self is mesh.hosts["b"]:
            records += 1
            if records == 4:
                if cut == "c":
                    mesh.servers["c"].stop()
                elif cut == "b":
                    mesh.servers["b"].stop()
                else:
                    mesh.servers["c"].drop_peer("b")
        return original(self, link)

    def rebuild(excluded: frozenset[str]) -> list[RemoteStage]:
        assert excluded == {lost} and not swap
        last = "a" if lost == "c" else "c"
        return [RemoteStage(mesh.links["a"], loop, MODEL, config, LayerSpan(0, 10)),
                RemoteStage(mesh.links["d"], loop, MODEL, config, LayerSpan(10, 20), direct=True),
                RemoteStage(mesh.links[last], loop, MODEL, config, LayerSpan(20, 30), direct=last != "a")]

    def replace(span: LayerSpan, excluded: frozenset[str]) -> RemoteStage:
        assert excluded == {lost}
        return RemoteStage(mesh.links["a"], loop, MODEL, config, span)  # stands in for the origin's own

    StageHost._answer_link = cut_in_step_three  # type: ignore[method-assign]
    stages = mesh.stages(THREE)
    pipeline = SplitPipeline(config, stages, rebuild, chain=True, replace=replace if swap else None)
    try:
        assert await blocking(greedy, pipeline, chat_ids(PROMPT), TOKENS, 9) == expected
        assert [r.lost for r in pipeline.replans] == [lost]
        if swap:  # the stages that were not lost are the same objects, in the same places
            kept = [k for k, (name, _, _) in enumerate(THREE) if name != lost]
            assert all(pipeline.stages[k] is stages[k] for k in kept)
            assert [peer for peer, _ in pipeline.route()] == ["a" if p == lost else p for p, _, _ in THREE]
    finally:
        StageHost._answer_link = original  # type: ignore[method-assign]
        await blocking(pipeline.close)


async def test_chain_frames_that_break_the_rules_are_refused(mesh: Mesh) -> None:
    hidden = np.zeros((1, gguf_model().config.hidden_size), np.float32)
    host = mesh.hosts["c"]
    for body in ({"from": "not a peer id"}, {"next": "c"}, {"next": {"peer": "d"}},
                 {"next": {"peer": "d", "seq": -1}}, {"next": {"peer": "x" * 200, "seq": 1}}):
        with pytest.raises(HostError) as refused:
            await host.open("a", {"model": MODEL, "span": "20:30", "seq": 1, **body})
        assert refused.value.code == wire.BAD_REQUEST
    opened = await host.open("a", {"model": MODEL, "span": "20:30", "seq": 2, "from": "b"})
    # another origin naming the same feeder and seq gets a feed of its own: no peer can take another's
    other = await host.open("x", {"model": MODEL, "span": "20:30", "seq": 2, "from": "b"})
    assert isinstance(opened["feed"], int) and isinstance(other["feed"], int)
    assert opened["feed"] != other["feed"]
    # a forward step over the data channel, and from a peer that was not named as the feeder
    step = wire.encode_input(1, "forward", 1, [opened["feed"]], hidden, 1)
    assert error_code(await host.compute("b", step)) == wire.BAD_TENSOR
    stranger = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", mesh.servers["c"].grant("d"))
    origin = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", mesh.servers["c"].grant("a"))
    feeder = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", mesh.servers["c"].grant("b"))
    try:
        assert error_code(await blocking(stranger.call, step, 5.0)) == wire.UNKNOWN_SEQUENCE
        # the named feeder, before the origin called the sequence on a direct link: its answer would have
        # nowhere to go, so the step is refused before the stage runs it
        assert error_code(await blocking(feeder.call, step, 5.0)) == wire.BAD_REQUEST
        session = host._sessions.get("a", 2)
        assert session is not None and session.hosted.stage.sequence_length(session.local_id) == 0
        # the origin's own chain step to a stage that does not pass it on is answered on its link, as a decode
        reply = await blocking(origin.call, wire.encode_input(2, "chain", 1, [2], hidden, 1), 5.0)
        assert reply_fields(reply.payload)["op"] == "logits"
        # a feeder's step names fed sequences only: the same number as the origin's own is not the origin's
        assert error_code(await blocking(origin.call, wire.encode_input(3, "forward", 2, [2], hidden, 1),
                                         5.0)) == wire.UNKNOWN_SEQUENCE
    finally:
        for client in (stranger, origin, feeder):
            client.close()
