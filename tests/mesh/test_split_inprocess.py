"""Split pipeline in one process: real stage hosts and NumPy stages, links that call the host directly.

The multi-process tests (test_split_nodes.py) run the same code over WebRTC; these pin down the pipeline's
logic cheaply: 2- and 3-stage splits equal one stage token for token, a lost stage is recovered with exactly
the no-fault tokens, malformed frames are refused without touching any KV cache.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
from shoal.mesh.p2p.errors import LinkClosed, RemoteError
from shoal.mesh.p2p.protocol import TENSOR, BinaryFrame
from shoal.mesh.split import wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.hosted import HostError, check_inputs
from shoal.mesh.split.pipeline import SplitPipeline
from shoal.mesh.split.remote_stage import RemoteStage, StageLost
from shoal.mesh.split.stage_host import CHECK_ON_LOOP_BYTES, StageHost
from shoal.mesh.split.stage_worker import StageWorker
from shoal.mesh.split.standby import Standby, remote_loader
from shoal.models.errors import CompileError
from shoal.models.span import LayerSpan

from tests.mesh.stage_links import LocalLink
from tests.mesh.tensor_frames import error_code, raw_input, reply_fields
from tests.models.shared_model import chat_ids, dequantized, gguf_model, reference_stage

MODEL = "smollm2"
PROMPTS = ["What is the capital of France?", "Name a primary colour.", "2+2="]
MAX_TOKENS = 5


def factory(name: str, span: LayerSpan, cid: str | None = None):
    if name != MODEL:
        raise LookupError(f"no model {name}")
    from shoal.models.reference import ReferenceStage

    return ReferenceStage(gguf_model(), span, load=dequantized)


class PeerLink(LocalLink):
    """An in-process link to a host standing in for peer `peer_id`; `cut()` injects a link failure."""

    def __init__(self, host: StageHost, peer_id: str) -> None:
        super().__init__(host)
        self.peer_id = peer_id
        self.calls = 0
        self.cut_after: int | None = None

    def _check(self) -> None:
        self.calls += 1
        if self.cut_after is not None and self.calls > self.cut_after:
            raise LinkClosed(f"link to {self.peer_id} closed")

    async def request(self, frame_type: str, body: dict[str, Any], timeout_s: float | None = None) -> dict:
        self._check()
        return (
            await self._host.open(self.peer_id, body)
            if frame_type == wire.STAGE_OPEN
            else await self._host.close(self.peer_id, body)
        )

    async def request_binary(
        self, kind: int, meta: dict[str, Any], payload: bytes = b"", timeout_s: float | None = None
    ) -> BinaryFrame:
        self._check()
        return await self._host.compute(self.peer_id, BinaryFrame(kind, self.calls, meta, payload))


def greedy(stage, prompt: list[int], n: int, seq_id: int, by_argmax: bool = False) -> list[int]:
    """Greedy tokens: argmax of the logits rows, or (`by_argmax`) the ids `decode_argmax` returns."""
    stage.add_sequence(seq_id)
    try:
        logits = stage.prefill(seq_id, np.asarray(prompt, dtype=np.int32))
        out = [int(np.argmax(logits))]
        while len(out) < n:
            last = np.asarray(out[-1:], dtype=np.int32)
            if by_argmax:
                out += stage.decode_argmax([seq_id], last)
            else:
                out.append(int(np.argmax(stage.decode([seq_id], last)[0])))
        return out
    finally:
        stage.remove_sequence(seq_id)


@pytest.fixture(scope="module")
def expected() -> dict[str, list[int]]:
    whole = reference_stage(0, 30)
    return {p: greedy(whole, chat_ids(p), MAX_TOKENS, 900_000 + i) for i, p in enumerate(PROMPTS)}


def gate_open() -> None:
    return None


async def blocking(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


@pytest.mark.parametrize(("cuts", "fp16"), [([15], False), ([9, 20], False), ([15], True)])
async def test_split_equals_single_stage(expected: dict[str, list[int]], cuts: list[int], fp16: bool) -> None:
    """fp16 hidden states on the wire happen to give the same greedy tokens for these prompts too."""
    loop = asyncio.get_running_loop()
    hosts = [StageHost(factory, gate_open) for _ in range(len(cuts) + 1)]
    bounds = [0, *cuts, 30]
    stages = [
        RemoteStage(PeerLink(h, f"peer{i}"), loop, MODEL, gguf_model().config, LayerSpan(a, b), fp16=fp16)
        for i, (h, a, b) in enumerate(zip(hosts, bounds, bounds[1:], strict=False))
    ]
    pipeline = SplitPipeline(gguf_model().config, stages, rebuild=lambda excluded: [])
    try:
        for i, prompt in enumerate(PROMPTS):  # odd prompts: the last stage sends back only the argmax
            got = await blocking(greedy, pipeline, chat_ids(prompt), MAX_TOKENS, i, i % 2 == 1)
            assert got == expected[prompt], prompt
        assert all(h.sequences == 0 for h in hosts)
        timings = pipeline.timings()
        assert [t["layers"] for t in timings] == [str(s.span) for s in stages]
        for t in timings:
            assert t["calls"] == len(PROMPTS) * MAX_TOKENS and t["seconds"] >= t["compute_s"] > 0, t
    finally:
        await blocking(pipeline.close)
        for h in hosts:
            await h.stop()


async def test_direct_local_stage_shares_the_host_with_peers(expected: dict[str, list[int]]) -> None:
    loop = asyncio.get_running_loop()
    config = gguf_model().config
    host = StageHost(factory, gate_open)
    direct = await host.direct_stage(MODEL, LayerSpan(0, 15))
    other = StageHost(factory, gate_open)
    remote = RemoteStage(PeerLink(other, "peer"), loop, MODEL, config, LayerSpan(15, 30))
    # a peer's sequence on the same hosted span, interleaved with ours
    await host.open("p", {"model": MODEL, "span": "0:15", "seq": 1})
    pipeline = SplitPipeline(config, [direct, remote], rebuild=lambda excluded: [])
    try:
        got = await blocking(greedy, pipeline, chat_ids(PROMPTS[1]), MAX_TOKENS, 3)
        assert got == expected[PROMPTS[1]]
        prefill = wire.encode_input(1, "prefill", 1, [1], np.asarray(chat_ids(PROMPTS[1]), dtype=np.int32))
        assert reply_fields((await host.compute("p", prefill)).payload)["op"] == "hidden"
        assert direct.timing.calls == MAX_TOKENS and direct.timing.compute_s == direct.timing.seconds
        assert host.sequences == 1  # the peer's; ours were removed with their sequence
    finally:
        await blocking(pipeline.close)
        await host.stop()
        await other.stop()


async def test_lost_stage_is_replanned_with_the_same_tokens(expected: dict[str, list[int]]) -> None:
    loop = asyncio.get_running_loop()
    config = gguf_model().config
    hosts = {name: StageHost(factory, gate_open) for name in ("a", "b", "c")}
    links = {name: PeerLink(h, name) for name, h in hosts.items()}
    links["b"].cut_after = 4  # open + prefill + 2 decode steps, then the link dies
    rebuilt: list[frozenset[str]] = []

    def rebuild(excluded: frozenset[str]) -> list[RemoteStage]:
        rebuilt.append(excluded)
        live = [n for n in ("a", "c") if n not in excluded]
        return [
            RemoteStage(links[live[0]], loop, MODEL, config, LayerSpan(0, 12)),
            RemoteStage(links[live[-1]], loop, MODEL, config, LayerSpan(12, 30)),
        ]

    first = [
        RemoteStage(links["a"], loop, MODEL, config, LayerSpan(0, 10)),
        RemoteStage(links["b"], loop, MODEL, config, LayerSpan(10, 30)),
    ]
    pipeline = SplitPipeline(config, first, rebuild)
    try:
        prompt = PROMPTS[0]
        got = await blocking(greedy, pipeline, chat_ids(prompt), MAX_TOKENS, 7)
        assert got == expected[prompt]
        assert rebuilt == [frozenset({"b"})]
        assert len(pipeline.replans) == 1 and pipeline.replans[0].lost == "b"
        assert [peer for peer, _ in pipeline.route()] == ["a", "c"]
    finally:
        await blocking(pipeline.close)
        for h in hosts.values():
            await h.stop()


class SilentLink(PeerLink):
    """A peer that stops answering after `cut_after` calls without closing anything (as after `kill -9`
    over a data channel: nothing arrives any more, and the mesh's heartbeats would take seconds to tell)."""

    def __init__(self, host: StageHost, peer_id: str) -> None:
        super().__init__(host, peer_id)
        self.heard = time.monotonic()
        self.silent_since: float | None = None

    @property
    def last_seen(self) -> float:
        return self.heard if self.silent_since is not None else time.monotonic()

    def _check(self) -> None:
        self.calls += 1
        if self.cut_after is not None and self.calls > self.cut_after and self.silent_since is None:
            self.heard = time.monotonic()
            self.silent_since = self.heard

    async def request_binary(
        self, kind: int, meta: dict[str, Any], payload: bytes = b"", timeout_s: float | None = None
    ) -> BinaryFrame:
        self._check()
        if self.silent_since is not None:
            await asyncio.Event().wait()  # never answers
        return await self._host.compute(self.peer_id, BinaryFrame(kind, self.calls, meta, payload))


async def test_a_silent_peer_is_found_by_a_ping_and_replanned(expected: dict[str, list[int]]) -> None:
    """A stage whose peer falls silent mid-stream (no error, no closed link) is lost once it misses a ping:
    the call fails in about `suspect_floor_s + probe_timeout_s`, not the 30 s stage timeout, and the tokens
    equal the no-fault run."""
    loop = asyncio.get_running_loop()
    config = gguf_model().config
    settings = SplitConfig(suspect_floor_s=0.2, probe_timeout_s=0.2)
    hosts = {name: StageHost(factory, gate_open) for name in ("a", "b")}
    silent = SilentLink(hosts["b"], "b")
    silent.cut_after = 4  # open + prefill + 2 decode steps, then nothing
    healthy = PeerLink(hosts["a"], "a")

    def rebuild(excluded: frozenset[str]) -> list[RemoteStage]:
        assert excluded == frozenset({"b"})
        return [RemoteStage(healthy, loop, MODEL, config, LayerSpan(0, 30), settings=settings)]

    first = [RemoteStage(healthy, loop, MODEL, config, LayerSpan(0, 10), settings=settings),
             RemoteStage(silent, loop, MODEL, config, LayerSpan(10, 30), settings=settings)]
    pipeline = SplitPipeline(config, first, rebuild)
    try:
        prompt = PROMPTS[0]
        got = await blocking(greedy, pipeline, chat_ids(prompt), MAX_TOKENS, 8)
        assert got == expected[prompt]
        assert silent.silent_since is not None and silent.pings >= 1
        assert [r.lost for r in pipeline.replans] == ["b"]
        assert "did not answer a ping" in pipeline.replans[0].reason
        print(f"silent peer: call failed after {pipeline.replans[0].phases['detect_s']:.2f} s")
    finally:
        await blocking(pipeline.close)
        for h in hosts.values():
            await h.stop()


class SlowOpenLink(PeerLink):
    """A peer that takes `open_s` to open a stage (as one that loads or compiles the span first)."""

    open_s = 2.5

    async def request(self, frame_type: str, body: dict[str, Any], timeout_s: float | None = None) -> dict:
        if frame_type == wire.STAGE_OPEN:
            await asyncio.sleep(self.open_s)
        return await super().request(frame_type, body, timeout_s)


async def test_a_slow_stage_open_and_a_recovery_are_reported(expected: dict[str, list[int]]) -> None:
    """The client hears of a long `stage.open` once a second (peer, layers, seconds) and of a lost stage and
    the resumed request (`Route.progress`, which the API writes as SSE comments)."""
    loop = asyncio.get_running_loop()
    config = gguf_model().config
    reports: list[dict[str, Any]] = []

    def progress(message: str, **data: Any) -> None:
        reports.append({"message": message, **data})

    hosts = {name: StageHost(factory, gate_open) for name in ("a", "b")}
    slow = SlowOpenLink(hosts["b"], "b")
    healthy = PeerLink(hosts["a"], "a")
    healthy.cut_after = 5  # open + prefill + 3 decode steps, then its link closes

    def rebuild(excluded: frozenset[str]) -> list[RemoteStage]:
        return [RemoteStage(slow, loop, MODEL, config, LayerSpan(0, 30), progress=progress)]

    first = [RemoteStage(healthy, loop, MODEL, config, LayerSpan(0, 10), progress=progress),
             RemoteStage(slow, loop, MODEL, config, LayerSpan(10, 30), progress=progress)]
    pipeline = SplitPipeline(config, first, rebuild, progress=progress)
    try:
        got = await blocking(greedy, pipeline, chat_ids(PROMPTS[1]), MAX_TOKENS, 9)
        assert got == expected[PROMPTS[1]]
    finally:
        await blocking(pipeline.close)
        for h in hosts.values():
            await h.stop()
    loads = [r for r in reports if r["waiting"] == "peer_load"]
    assert len(loads) >= 2 * 2, reports  # two slow opens of ~2.5 s each: at least two reports apiece
    assert {r["layers"] for r in loads} == {"10:30", "0:30"} and {r["peer"] for r in loads} == {"b"}
    assert all(0.5 < r["seconds"] < 60 for r in loads)
    recovery = [r["message"] for r in reports if r["waiting"] == "recovery"]
    assert len(recovery) == 2 and "peer a was lost" in recovery[0]
    assert recovery[1].startswith("resumed on b 0:30")


class OneLinkMesh:
    """The part of a `MeshHandle` standby's remote loads use: `peer(id)`."""

    def __init__(self, link: PeerLink) -> None:
        self.link = link

    def peer(self, peer_id: str) -> PeerLink:
        assert peer_id == self.link.peer_id
        return self.link


async def test_standby_loads_spans_once_in_the_background() -> None:
    host = StageHost(factory, gate_open)
    peer_host = StageHost(factory, gate_open)
    standby = Standby(host.prepare, host.holds,
                      remote_loader(OneLinkMesh(PeerLink(peer_host, "b")), SplitConfig()))  # type: ignore[arg-type]
    try:
        await host.prepare(MODEL, LayerSpan(0, 10))
        assert not standby.want(MODEL, LayerSpan(0, 10)), "a held span is not loaded again"
        assert standby.want(MODEL, LayerSpan(10, 30))
        assert not standby.want(MODEL, LayerSpan(10, 30)), "a queued span is not queued twice"
        assert standby.want("no-such-model", LayerSpan(0, 30))  # fails in the background, skipped
        for _ in range(600):
            if len(standby.loaded) == 1 and not standby._wanted:
                break
            await asyncio.sleep(0.05)
        assert standby.loaded == [(MODEL, "10:30")]
        assert host.holds(MODEL, LayerSpan(10, 30)) and not host.holds("no-such-model", LayerSpan(0, 30))
        direct = await host.direct_stage(MODEL, LayerSpan(10, 30))  # the loaded stage, no second load
        assert direct.span == LayerSpan(10, 30)
        # a peer's span: a sequence opened and closed there, the stage left loaded; not asked twice
        assert standby.want(MODEL, LayerSpan(0, 30), peer="b")
        assert not standby.want(MODEL, LayerSpan(0, 30), peer="b")
        for _ in range(600):
            if len(standby.loaded) == 2:
                break
            await asyncio.sleep(0.05)
        assert standby.loaded[-1] == (f"b:{MODEL}", "0:30")
        assert peer_host.holds(MODEL, LayerSpan(0, 30)) and peer_host.sequences == 0
        assert not standby.want(MODEL, LayerSpan(0, 30), peer="b"), "asked lately"
    finally:
        await standby.stop()
        await host.stop()
        await peer_host.stop()


@pytest.mark.parametrize(("lost", "by_argmax"), [(1, True), (2, False), (0, True)])
async def test_a_lost_stage_is_patched_the_others_keep_their_caches(
        expected: dict[str, list[int]], lost: int, by_argmax: bool) -> None:
    """With `replace`, only the lost stage's span gets a new stage (prefilled with the inputs the lost one
    had); the other stages are not opened again, and the tokens equal the no-fault run (middle, last and
    first stage lost)."""
    loop = asyncio.get_running_loop()
    config = gguf_model().config
    names = ("a", "b", "c")
    hosts = {name: StageHost(factory, gate_open) for name in (*names, "d")}
    links = {name: PeerLink(h, name) for name, h in hosts.items()}
    links[names[lost]].cut_after = 4  # open + prefill + 2 decode steps, then the link dies
    spans = [LayerSpan(0, 10), LayerSpan(10, 20), LayerSpan(20, 30)]
    replaced: list[tuple[LayerSpan, frozenset[str]]] = []

    def replace(span: LayerSpan, excluded: frozenset[str]) -> RemoteStage:
        replaced.append((span, excluded))
        return RemoteStage(links["d"], loop, MODEL, config, span)

    def rebuild(excluded: frozenset[str]) -> list[RemoteStage]:
        raise AssertionError("patched, not re-planned")

    first = [RemoteStage(links[n], loop, MODEL, config, span) for n, span in zip(names, spans, strict=True)]
    pipeline = SplitPipeline(config, first, rebuild, replace=replace)
    try:
        prompt = PROMPTS[2]
        got = await blocking(greedy, pipeline, chat_ids(prompt), MAX_TOKENS, 11, by_argmax)
        assert got == expected[prompt]
        assert replaced == [(spans[lost], frozenset({names[lost]}))]
        want = [("d" if i == lost else n) for i, n in enumerate(names)]
        assert [peer for peer, _ in pipeline.route()] == want
        others = [links[n] for i, n in enumerate(names) if i != lost]
        # open, prefill, MAX_TOKENS - 1 decode steps, close: nothing was opened or replayed again there
        assert all(h.calls == 2 + MAX_TOKENS for h in others), [h.calls for h in others]
        assert pipeline.replans[0].phases["close_s"] == 0.0
    finally:
        await blocking(pipeline.close)
        for h in hosts.values():
            await h.stop()


async def test_idle_stages_are_trimmed_least_recently_used_and_standby_keeps_to_the_room() -> None:
    """A standby stage (never used) is the first idle stage closed, so it cannot push out a span requests use;
    standby loads nothing here once the host's idle room is taken."""
    host = StageHost(factory, gate_open, keep_idle_stages=1)
    standby = Standby(host.prepare, host.holds, room=host.idle_room)
    try:
        await host.prepare(MODEL, LayerSpan(0, 10))  # as standby does: idle, never used
        assert host.idle_room() == 0
        assert not standby.want(MODEL, LayerSpan(20, 30)), "no room for another idle stage"
        await host.open("p", {"model": MODEL, "span": "10:20", "seq": 1})
        await host.close("p", {"seq": 1})  # 10:20 idle too, and just used: 0:10 goes
        assert host.holds(MODEL, LayerSpan(10, 20)) and not host.holds(MODEL, LayerSpan(0, 10))
    finally:
        await standby.stop()
        await host.stop()


async def test_replans_are_bounded() -> None:
    loop = asyncio.get_running_loop()
    config = gguf_model().config
    host = StageHost(factory, gate_open)
    link = PeerLink(host, "flaky")
    link.cut_after = 0

    def rebuild(excluded: frozenset[str]) -> list[RemoteStage]:
        return [RemoteStage(link, loop, MODEL, config, LayerSpan(0, 30))]

    pipeline = SplitPipeline(config, rebuild(frozenset()), rebuild, max_replans=2)
    with pytest.raises(StageLost):
        await blocking(pipeline.add_sequence, 1)
    await host.stop()


async def test_malformed_frames_are_refused_and_the_stage_survives(expected: dict[str, list[int]]) -> None:
    host = StageHost(factory, gate_open)
    config = gguf_model().config
    try:
        await host.open("p", {"model": MODEL, "span": "10:30", "seq": 5})
        hidden = np.zeros((1, config.hidden_size), dtype=np.float32)
        good = wire.encode_input(1, "decode", 1, [5], hidden)
        nan = np.full((1, config.hidden_size), np.nan, np.float32)
        bad_payloads = [
            (raw_input(seqs=(5,), cols=575, data=good.payload[-4 * 576:]), wire.BAD_TENSOR),  # wrong shape
            (raw_input(seqs=(5,), dtype=9), wire.BAD_TENSOR),  # unknown dtype
            (good.payload[:-4], wire.BAD_TENSOR),  # wrong size
            (raw_input(seqs=(6,)), wire.UNKNOWN_SEQUENCE),
            (raw_input(seqs=(5,), dtype=wire.I32), wire.BAD_TENSOR),  # ids into a middle stage
            (raw_input(seqs=(5,), op=77), wire.BAD_TENSOR),
            (raw_input(seqs=(5,), ndim=3), wire.BAD_TENSOR),
            (raw_input(seqs=(5, 5), rows=2, data=bytes(2 * 4 * 576)), wire.BAD_TENSOR),  # one sequence twice
            (raw_input(seqs=(5,), count=2), wire.BAD_TENSOR),  # more sequences than the frame holds
            (raw_input(seqs=(5,), reply=7), wire.BAD_TENSOR),
            (raw_input(seqs=(5,))[:10], wire.BAD_TENSOR),  # shorter than the header
            (b"", wire.BAD_TENSOR),
            (wire.encode_input(9, "decode", 1, [5], nan).payload, wire.BAD_TENSOR),
        ]
        for call, (payload, code) in enumerate(bad_payloads, start=2):
            reply = await host.compute("p", BinaryFrame(TENSOR, call, {}, payload))
            assert error_code(reply) == code and reply.request_id == call, payload[:40]
        assert host.refused == len(bad_payloads) and host.calls == 0
        session = host._sessions.get("p", 5)
        assert session is not None and session.hosted.stage.sequence_length(session.local_id) == 0
        assert error_code(await host.compute("q", good)) == wire.UNKNOWN_SEQUENCE  # not q's sequence
        ok = await host.compute("p", good)
        assert reply_fields(ok.payload)["op"] == "logits" and host.calls == 1
        first = await host.open("p", {"model": MODEL, "span": "0:10", "seq": 8})
        assert first["hidden"] == config.hidden_size
        ids = wire.encode_input(10, "prefill", 1, [8], np.array([1, 99999], dtype=np.int32))
        assert error_code(await host.compute("p", ids)) == wire.BAD_TENSOR  # id outside the vocabulary
        # a prefill too large to check on the loop is checked on the worker, with the same answer
        rows = CHECK_ON_LOOP_BYTES // (4 * config.hidden_size) + 1
        await host.open("p", {"model": MODEL, "span": "10:30", "seq": 9})
        big = np.zeros((rows, config.hidden_size), dtype=np.float32)
        big[-1, -1] = np.inf
        reply = await host.compute("p", wire.encode_input(11, "prefill", 1, [9], big))
        assert error_code(reply) == wire.BAD_TENSOR and host.calls == 1
    finally:
        await host.stop()


async def test_open_is_validated_and_gated() -> None:
    refusing = StageHost(factory, lambda: "this node does not serve others")
    with pytest.raises(HostError) as info:
        await refusing.open("p", {"model": MODEL, "span": "0:10", "seq": 1})
    assert info.value.code == wire.REFUSED and isinstance(info.value, RemoteError)
    host = StageHost(factory, gate_open)
    for body, code in [
        ({"model": "nope", "span": "0:10", "seq": 1}, wire.NO_MODEL),
        ({"model": MODEL, "span": "10:5", "seq": 1}, wire.BAD_REQUEST),
        ({"model": MODEL, "span": "0:31", "seq": 1}, wire.BAD_REQUEST),
        ({"model": MODEL, "span": "0:10", "seq": -1}, wire.BAD_REQUEST),
        ({"model": MODEL, "seq": 1}, wire.BAD_REQUEST),
        ({"model": MODEL, "span": "0:10", "seq": 1, "cid": "../../etc"}, wire.BAD_REQUEST),
    ]:
        with pytest.raises(HostError) as info:
            await host.open("p", body)
        assert info.value.code == code, body
    await host.stop()
    await refusing.stop()

    def broken(name: str, span: LayerSpan, cid: str | None = None):
        raise CompileError("injected: the shard does not build")  # a fault of this node, not of the request

    failing = StageHost(broken, gate_open)
    with pytest.raises(HostError) as info:
        await failing.open("p", {"model": MODEL, "span": "0:10", "seq": 1})
    assert info.value.code == wire.INTERNAL  # RemoteStage turns this into StageLost: the origin re-plans
    await failing.stop()


@pytest.mark.parametrize("size", [49_152, 1000, 100, 64])
def test_top_k_ids_equal_a_full_sort(size: int) -> None:
    rng = np.random.default_rng(size)
    for trial in range(20):
        row = rng.standard_normal(size).astype(np.float32) * 4
        if trial % 2:
            row = np.round(row)  # many ties, also at the k-th value
        for k in (1, 8, 63, 256):
            if k >= size:
                continue
            ids = wire.top_k_ids(row, k)
            assert len(ids) == k and len(set(ids.tolist())) == k
            assert np.array_equal(np.sort(row[ids]), np.sort(row)[-k:])
            if k == 1:  # the argmax greedy decoding takes: the lowest id among ties
                assert ids[0] == np.flatnonzero(row == row.max())[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_hidden_states_are_finite_or_refused_even_where_their_sum_overflows(dtype: type) -> None:
    """`check_inputs` tells finite values by one float64 sum: values at the dtype's limit, whose sum in that
    dtype would overflow, are finite and pass; an inf or a NaN among them is refused."""
    stage = reference_stage(10, 30)
    width = stage.config.hidden_size
    largest = float(np.finfo(dtype).max)
    huge = np.full((1, width), largest, dtype=dtype)  # finite, but its sum overflows in `dtype`
    with np.errstate(over="ignore"):
        assert not np.isfinite(huge.sum())
    checked = check_inputs(stage, wire.TensorMessage(1, "decode", 1, huge, (5,)))
    assert checked.dtype == np.float32 and np.array_equal(checked, huge.astype(np.float32))
    for bad in (np.inf, -np.inf, np.nan):
        poisoned = np.full((1, width), 1.0, dtype=dtype)
        poisoned[0, width // 2] = bad
        with pytest.raises(wire.FrameError, match="finite"):
            check_inputs(stage, wire.TensorMessage(1, "decode", 1, poisoned, (5,)))
        poisoned = huge.copy()  # an inf beside values whose sum overflows anyway
        poisoned[0, 0] = bad
        with pytest.raises(wire.FrameError, match="finite"):
            check_inputs(stage, wire.TensorMessage(1, "decode", 1, poisoned, (5,)))


def test_top_k_ids_fall_back_on_non_finite_rows() -> None:
    row = np.full(49_152, -np.inf, dtype=np.float32)
    row[[5, 7000, 40000]] = [1.0, 3.0, 2.0]
    assert sorted(wire.top_k_ids(row, 3).tolist()) == [5, 7000, 40000]
    row[100] = np.nan  # NaN is never chosen over a number (as before)
    assert 100 not in wire.top_k_ids(row, 3).tolist()


def test_top_k_logits_round_trip() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 1000)).astype(np.float32)
    frame = wire.encode_logits(3, 1, logits, 16)
    assert len(frame.payload) == wire.OUTPUT_HEAD.size + 2 * 16 * 8
    message = wire.decode_output(frame, 1000)
    assert message.top_ids is not None and message.top_values is not None and message.array is None
    back = wire.expand_top_k(message.top_ids, message.top_values, 1000)
    assert back.shape == (2, 1000)
    assert (np.argmax(back, axis=1) == np.argmax(logits, axis=1)).all()
    top = np.sort(logits, axis=1)[:, -16:]
    assert np.allclose(np.sort(back, axis=1)[:, -16:], top)
    assert np.isneginf(back).sum() == 2 * (1000 - 16)
    full = wire.decode_output(wire.encode_logits(3, 1, logits, 0), 1000).array
    assert full is not None and np.array_equal(full, logits)
    logits[1, 7] = logits[1, 9] = 99.0  # greedy: each row's argmax, the lowest id among ties
    greedy = wire.decode_output(wire.encode_logits(3, 1, logits, 1), 1000)
    assert greedy.top_ids is not None and greedy.top_values is not None
    assert greedy.top_ids.tolist() == [[int(np.argmax(logits[0]))], [7]]
    assert greedy.top_values.tolist() == [[logits[0].max()], [99.0]]


async def test_stage_worker_runs_calls_in_order_off_the_loop() -> None:
    import threading

    worker = StageWorker("test-stage-worker")
    loop_thread = threading.get_ident()
    seen: list[tuple[int, int]] = []

    def call(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i * i

    try:
        results = await asyncio.gather(*(worker.run(call, i) for i in range(20)))
        assert results == [i * i for i in range(20)]
        assert [i for i, _ in seen] == list(range(20))
        assert len({t for _, t in seen}) == 1 and seen[0][1] != loop_thread

        def fail() -> None:
            raise ValueError("bad input")

        with pytest.raises(ValueError, match="bad input"):
            await worker.run(fail)
        assert await worker.run(call, 3) == 9  # an exception does not stop the worker
        cancelled = asyncio.ensure_future(worker.run(call, 4))
        await asyncio.sleep(0)
        cancelled.cancel()  # the call still runs; its result is dropped, not set on a cancelled future
        assert await worker.run(call, 5) == 25
    finally:
        worker.stop()
        worker.stop()  # idempotent
    with pytest.raises(HostError):
        await worker.run(call, 6)
