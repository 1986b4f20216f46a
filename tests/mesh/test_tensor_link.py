"""Direct tensor links (mesh/tensor_link.py): the sealed record format, and real TCP links on 127.0.0.1
between a `RemoteStage` and a real `StageHost` (NumPy stages): a split over a direct link equals one stage
token for token, malformed frames get error frames, a forged/replayed/oversized record or a wrong token ends
the link, and a link cut mid-generation is a lost stage that the pipeline re-plans with exactly the no-fault
tokens.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from shoal.mesh.p2p.errors import ProtocolError
from shoal.mesh.p2p.protocol import TENSOR, BinaryFrame
from shoal.mesh.split import arrival, stage_worker, wire
from shoal.mesh.split import tensor_link as tl
from shoal.mesh.split import tensor_link_server as tls
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.pipeline import SplitPipeline
from shoal.mesh.split.remote_stage import RemoteStage
from shoal.mesh.split.stage_host import StageHost
from shoal.mesh.split.stage_link import DirectLinkFailures
from shoal.models.span import LayerSpan

from tests.mesh.tensor_frames import error_code, raw_input, reply_fields
from tests.mesh.test_split_inprocess import MODEL, PeerLink, blocking, factory, gate_open, greedy
from tests.models.shared_model import chat_ids, gguf_model, reference_stage

PROMPT = "What is the capital of France?"
TOKENS = 5


# --- records ----------------------------------------------------------------------------------------------

def test_records_round_trip_and_refuse_tampering_replay_and_reflection() -> None:
    key = os.urandom(32)
    origin, stage = tl.Sealer(key, tl.TO_STAGE), tl.Sealer(key, tl.TO_ORIGIN)
    frame = BinaryFrame(TENSOR, 7, {}, b"\x01\x02" * 100)
    first = origin.seal(tl.encode_frame(frame))
    assert struct.unpack_from("<I", first)[0] == len(first) - 4
    assert tl.decode_frame(stage.open(first[4:])) == frame
    with pytest.raises(tl.LinkError):  # the same record again: the counter moved on
        stage.open(first[4:])
    second = bytearray(origin.seal(tl.encode_frame(frame)))
    second[20] ^= 1
    with pytest.raises(tl.LinkError):
        stage.open(bytes(second[4:]))
    with pytest.raises(tl.LinkError):  # a record sent back the way it came
        tl.Sealer(key, tl.TO_STAGE).open(tl.Sealer(key, tl.TO_STAGE).seal(b"x")[4:])
    with pytest.raises(ValueError):
        tl.encode_frame(BinaryFrame(2, 1, {}, b""))  # blocks do not travel on tensor links
    with pytest.raises(ValueError):
        tl.encode_frame(BinaryFrame(TENSOR, 1, {"op": "decode"}, b""))  # nor metadata


@given(st.binary(max_size=300))
def test_any_plaintext_decodes_or_is_refused(data: bytes) -> None:
    try:
        frame = tl.decode_frame(data)
    except tl.LinkError:
        return
    assert frame.kind == TENSOR and frame.meta == {} and tl.encode_frame(frame) == data


@given(st.binary(max_size=200))
def test_any_tensor_payload_decodes_or_is_refused(data: bytes) -> None:
    frame = BinaryFrame(TENSOR, 1, {}, data)
    try:
        message = wire.decode_input(frame)
    except wire.FrameError:
        pass
    else:
        assert message.array is not None and message.op in wire.OPS_IN
    try:
        reply = wire.decode_output(frame, vocab=8)
    except ProtocolError:
        return
    assert reply.op in wire.OPS_OUT and (reply.array is None) == (reply.op == "error")


def test_tensor_frames_round_trip() -> None:
    hidden = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)
    message = wire.decode_input(wire.encode_input(9, "decode", 41, [3, 2**32 - 1], hidden, 4, fp16=True))
    assert (message.call, message.op, message.step, message.seqs, message.top_k) == (9, "decode", 41,
                                                                                  (3, 2**32 - 1), 4)
    assert message.reply_f16 and message.array is not None and message.array.dtype == np.float16
    assert np.array_equal(message.array, hidden)
    ids = wire.decode_input(wire.encode_input(1, "prefill", 0, [7], np.array([5, 6, 7], np.int32)))
    assert ids.array is not None and ids.array.tolist() == [5, 6, 7] and not ids.reply_f16
    back = wire.decode_output(wire.encode_hidden(2, 41, hidden, fp16=True, compute_s=0.0123), vocab=8)
    assert back.array is not None and back.array.dtype == np.float32 and np.array_equal(back.array, hidden)
    assert (back.op, back.step, back.compute_s) == ("hidden", 41, 0.0123)
    error = wire.decode_output(wire.encode_error(3, 41, wire.BUSY, "full"), vocab=8)
    assert error.error == (wire.BUSY, "full") and error.array is None
    with pytest.raises(ValueError):
        wire.encode_input(1, "decode", 1, [2**32], hidden)  # not a u32


# --- real links -------------------------------------------------------------------------------------------

class DirectPeerLink(PeerLink):
    """An in-process control link to `host` standing in for peer `peer_id`, whose node listens for direct
    tensor links on 127.0.0.1 (a real `TensorLinkServer`)."""

    def __init__(self, host: StageHost, peer_id: str, server: tls.TensorLinkServer) -> None:
        super().__init__(host, peer_id)
        self.server = server
        self.api_address = "127.0.0.1:8740"
        self.binary_calls = 0
        self.is_open = True

    async def request(self, frame_type: str, body: dict[str, Any], timeout_s: float | None = None) -> dict:
        if frame_type == tl.TENSOR_LINK:
            return self.server.grant(self.peer_id)
        return await super().request(frame_type, body, timeout_s)

    async def request_binary(self, kind: int, meta: dict[str, Any], payload: bytes = b"",
                             timeout_s: float | None = None) -> BinaryFrame:
        self.binary_calls += 1
        return await super().request_binary(kind, meta, payload, timeout_s)


async def connect_when_free(server: tls.TensorLinkServer, peer: str, within_s: float = 10.0
                            ) -> tl.TensorLinkClient:
    """Connect as soon as the server has room again (it frees slots as it notices closed sockets)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await blocking(tl.TensorLinkClient.connect, "127.0.0.1", server.grant(peer))
        except tl.LinkError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def expected() -> list[int]:
    return greedy(reference_stage(0, 30), chat_ids(PROMPT), TOKENS, 990_001)


@pytest.fixture
async def served(request, native_lane):
    """Two stage hosts a and b, b with a listening tensor link server (its worker's poll budget
    `request.param` seconds, indirect parametrisation; 0 by default, as `[split] link_spin_us`), with and
    without the native step lane."""
    spin_s = getattr(request, "param", 0.0)
    hosts = {name: StageHost(factory, gate_open, link_spin_s=spin_s, native_lane=native_lane)
             for name in "ab"}
    server = tls.TensorLinkServer(hosts["b"].serve_link)
    server.start("127.0.0.1")
    links = {"a": PeerLink(hosts["a"], "a"), "b": DirectPeerLink(hosts["b"], "b", server)}
    try:
        yield hosts, server, links
    finally:
        server.stop()
        for host in hosts.values():
            await host.stop()


@pytest.mark.parametrize("by_argmax", [False, True])
async def test_split_over_a_direct_link_equals_one_stage(served, expected: list[int],
                                                         by_argmax: bool) -> None:
    hosts, _, links = served
    loop, config = asyncio.get_running_loop(), gguf_model().config
    native = hosts["b"]._native_lane() is not None
    settings = SplitConfig(native_lane=native)  # the origin uses the lane where the stage does
    stages = [RemoteStage(links["a"], loop, MODEL, config, LayerSpan(0, 15)),
              RemoteStage(links["b"], loop, MODEL, config, LayerSpan(15, 30), direct=True, settings=settings)]
    pipeline = SplitPipeline(config, stages, lambda excluded: [])
    try:
        assert await blocking(greedy, pipeline, chat_ids(PROMPT), TOKENS, 3, by_argmax) == expected
        assert [t["link"] for t in pipeline.timings()] == ["channel", "direct"]
        assert links["b"].binary_calls == 0 and hosts["b"].calls == TOKENS  # prefill + 4 decodes, all direct
        # the first decode step arms the native lane, the others take it — when the origin wants the argmax
        # back (top-k logits are the generic path's)
        assert hosts["b"].lane_steps == (TOKENS - 2 if native and by_argmax else 0)
    finally:
        await blocking(pipeline.close)


@pytest.mark.parametrize("served", [400e-6], indirect=True)
async def test_decode_waits_poll_around_the_beat_and_change_no_token(served, monkeypatch) -> None:
    """With a poll budget and a steady beat, both ends of the link poll for the next record around when it is
    due (`split.arrival`) — the client for its answers, the stage worker for the next request — and the tokens
    are the reference's."""
    _, _, links = served
    monkeypatch.setattr(arrival, "MAX_GAP_S", 60.0)  # a loaded machine's slow NumPy steps are a beat too
    waits: dict[str, list[bool]] = {"client": [], "worker": []}

    def spy(end: str, wait: Callable[..., bool]) -> Callable[..., bool]:
        def counted(*args: Any) -> bool:
            waits[end].append(wait(*args))
            return waits[end][-1]
        return counted

    monkeypatch.setattr(tl, "wait_readable", spy("client", arrival.wait_readable))
    monkeypatch.setattr(stage_worker, "wait_readable", spy("worker", arrival.wait_readable))
    loop, config = asyncio.get_running_loop(), gguf_model().config
    tokens = 12
    stages = [RemoteStage(links["a"], loop, MODEL, config, LayerSpan(0, 15)),
              RemoteStage(links["b"], loop, MODEL, config, LayerSpan(15, 30), direct=True,
                          settings=SplitConfig(link_spin_us=400))]
    pipeline = SplitPipeline(config, stages, lambda excluded: [])
    try:
        want = greedy(reference_stage(0, 30), chat_ids(PROMPT), tokens, 990_002)
        assert await blocking(greedy, pipeline, chat_ids(PROMPT), tokens, 5) == want
    finally:
        await blocking(pipeline.close)
    # the first MIN_GAPS decode answers only teach the beat; every later decode call polls first
    assert len(waits["client"]) == tokens - 1 - arrival.MIN_GAPS, waits
    assert len(waits["worker"]) >= tokens - 1 - arrival.MIN_GAPS, waits


async def test_long_records_cross_in_pieces(served) -> None:
    """A long prompt's hidden states (over `FIRST_READ`) both ways: the reader gathers a record's rest."""
    _, _, links = served
    loop, config = asyncio.get_running_loop(), gguf_model().config
    ids = np.resize(np.asarray(chat_ids(PROMPT), dtype=np.int32), 120)
    assert ids.size * config.hidden_size * 4 > tl.FIRST_READ
    first = RemoteStage(links["b"], loop, MODEL, config, LayerSpan(0, 15), direct=True)
    second = RemoteStage(links["b"], loop, MODEL, config, LayerSpan(15, 30), direct=True, top_k=0)
    local_first, local_second = reference_stage(0, 15), reference_stage(15, 30)
    try:
        for stage in (first, second, local_first, local_second):
            await blocking(stage.add_sequence, 77)
        hidden = await blocking(first.prefill, 77, ids)  # a long reply
        want = local_first.prefill(77, ids)
        assert hidden.shape == want.shape and np.allclose(hidden, want, atol=1e-5)
        logits = await blocking(second.prefill, 77, hidden)  # a long request
        assert np.allclose(logits, local_second.prefill(77, want), atol=1e-4)
        assert first.transport == second.transport == "direct" and links["b"].binary_calls == 0
    finally:
        for stage in (first, second, local_first, local_second):
            await blocking(stage.remove_sequence, 77)
        await blocking(first.close)
        await blocking(second.close)


async def test_malformed_frames_on_a_direct_link_get_error_frames(served) -> None:
    hosts, server, _ = served
    config = gguf_model().config
    await hosts["b"].open("b", {"model": MODEL, "span": "15:30", "seq": 5})
    client = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", server.grant("b"))
    good = wire.encode_input(1, "decode", 1, [5], np.zeros((1, config.hidden_size), np.float32))
    bad = [
        raw_input(seqs=(5,), cols=575, data=good.payload[-4 * 575:]),
        raw_input(seqs=(6,)),  # not this peer's sequence
        b"",
        good.payload[:-4],
    ]
    try:
        for call, payload in enumerate(bad, start=2):
            reply = await blocking(client.call, BinaryFrame(TENSOR, call, {}, payload), 5.0)
            assert error_code(reply) is not None and reply.request_id == call, reply_fields(reply.payload)
        reply = await blocking(client.call, BinaryFrame(TENSOR, 9, {}, good.payload), 5.0)
        assert reply_fields(reply.payload)["op"] == "logits"
        assert hosts["b"].calls == 1 and hosts["b"].refused == len(bad)
    finally:
        client.close()


async def test_a_stage_that_fails_a_steady_step_answers_an_error_frame_and_lives(served, monkeypatch) -> None:
    """With and without the native step lane: a step whose compute fails is refused with an error frame (the
    lane's own boundary, as the generic path's), and the next steps are taken again."""
    hosts, server, _ = served
    host, config = hosts["b"], gguf_model().config
    await host.open("b", {"model": MODEL, "span": "15:30", "seq": 5})
    client = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", server.grant("b"))
    hidden = np.ones((1, config.hidden_size), np.float32)
    original = StageHost._timed_forward
    failing = {4}

    def faulty(stage, op: str, ids: list[int], inputs: np.ndarray):
        if host.calls + host.refused + 1 in failing:
            raise RuntimeError("injected compute fault")
        return original(stage, op, ids, inputs)

    monkeypatch.setattr(StageHost, "_timed_forward", staticmethod(faulty))
    try:
        replies = []
        for step in range(1, 8):
            frame = wire.encode_input(step, "decode", step, [5], hidden, top_k=1)
            replies.append(reply_fields((await blocking(client.call, frame, 5.0)).payload))
        assert [r["op"] for r in replies] == ["logits"] * 3 + ["error"] + ["logits"] * 3, replies
        assert host.refused == 1 and host.calls == 6
        native = host._native_lane() is not None
        assert host.lane_steps == (2 + 2 if native else 0)  # steps 1 and 5 armed the lane (again)
    finally:
        client.close()


async def test_tokens_are_single_use_and_checked(served) -> None:
    _, server, _ = served
    grant = server.grant("b")
    with pytest.raises(tl.LinkError):
        await blocking(tl.TensorLinkClient.connect, "127.0.0.1", {**grant, "token": os.urandom(16).hex()})
    client = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", grant)
    client.close()
    with pytest.raises(tl.LinkError):  # the same grant again
        await blocking(tl.TensorLinkClient.connect, "127.0.0.1", grant)
    with pytest.raises(tl.LinkError):  # right token, wrong key: the handshake record does not open
        await blocking(tl.TensorLinkClient.connect, "127.0.0.1", {**server.grant("b"), "key": "00" * 32})
    with pytest.raises(tl.LinkError):
        tl.TensorLinkClient.connect("127.0.0.1", {"port": "x"})


def raw_link(server: tls.TensorLinkServer) -> tuple[socket.socket, tl.Sealer]:
    """A link to `server` as peer b, made by hand (the socket and the origin's sealer, past the handshake)."""
    grant = server.grant("b")
    sock = socket.create_connection(("127.0.0.1", grant["port"]), timeout=5)
    sock.sendall(bytes.fromhex(grant["token"]))
    sealer = tl.Sealer(bytes.fromhex(grant["key"]), tl.TO_STAGE)
    assert tl.read_record(sock, sealer) == b""  # accepted
    return sock, sealer


async def test_records_back_to_back_are_answered_in_order(served) -> None:
    """A chain's upstream stage sends each step as it has it (`split.stage_chain`): a stage node reads
    records back to back, bytes past one kept for the next."""
    sock, sealer = raw_link(served[1])
    try:
        frames = [tl.encode_frame(BinaryFrame(TENSOR, call, {}, raw_input(seqs=(1,)))) for call in (1, 2, 3)]
        sock.sendall(b"".join(sealer.seal(frame) for frame in frames))
        stream = tl.RecordStream(sock, sealer)
        answers = [tl.decode_frame(stream.read()) for _ in frames]
        assert [a.request_id for a in answers] == [1, 2, 3]  # unknown sequence, each in its turn
        assert {error_code(a) for a in answers} == {wire.UNKNOWN_SEQUENCE}
    finally:
        sock.close()


async def test_a_bad_length_behind_a_good_record_ends_the_link_and_the_worker_lives(served) -> None:
    """The worker looks for a second record behind the one it answered: a length out of bounds there ends
    the link (the good record still answered), never the worker thread."""
    hosts, server, _ = served
    sock, sealer = raw_link(server)
    try:
        frame = tl.encode_frame(BinaryFrame(TENSOR, 1, {}, raw_input(seqs=(1,))))
        sock.sendall(sealer.seal(frame) + struct.pack("<I", tl.MAX_RECORD + 1))
        assert error_code(tl.decode_frame(tl.read_record(sock, sealer))) == wire.UNKNOWN_SEQUENCE
        assert sock.recv(100) == b""  # then the stage node closed the link
    finally:
        sock.close()
    await hosts["b"].open("b", {"model": MODEL, "span": "15:30", "seq": 1})
    client = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", server.grant("b"))
    hidden = np.zeros((1, gguf_model().config.hidden_size), np.float32)
    try:  # the worker still serves other links
        reply = await blocking(client.call, wire.encode_input(1, "decode", 1, [1], hidden), 5.0)
        assert reply_fields(reply.payload)["op"] == "logits"
    finally:
        client.close()


async def test_a_one_way_link_in_use_is_not_waited_for(served) -> None:
    """`usable_one_way` runs on the event loop: while another thread holds the link (a send in progress) it
    answers at once instead of waiting for the lock."""
    _, server, _ = served
    client = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", server.grant("b"))
    try:
        with client._lock:
            started = time.monotonic()
            assert client.usable_one_way()
            assert time.monotonic() - started < 1.0
        assert client.usable_one_way()
        server.drop_peer("b")  # the stage node closes it: its end turns readable here
        await blocking(select.select, [client._sock], [], [], 5.0)
        assert not client.usable_one_way()
    finally:
        client.close()


@pytest.mark.parametrize("fault", ["forged", "oversized", "garbage"])
async def test_a_bad_record_ends_the_link_and_the_worker_lives(served, fault: str) -> None:
    hosts, server, _ = served
    sock, sealer = raw_link(server)
    try:
        if fault == "forged":
            record = bytearray(sealer.seal(b"\0" * 8))
            record[-1] ^= 0xFF
            sock.sendall(record)
        elif fault == "oversized":
            sock.sendall(struct.pack("<I", tl.MAX_RECORD + 1))
        else:
            sock.sendall(b"\x05\x00\x00\x00abcde")
        sock.settimeout(5)
        assert sock.recv(100) == b""  # the stage node closed the link
    finally:
        sock.close()
    # the worker still serves other links
    await hosts["b"].open("b", {"model": MODEL, "span": "15:30", "seq": 1})
    client = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", server.grant("b"))
    hidden = np.zeros((1, gguf_model().config.hidden_size), np.float32)
    frame = wire.encode_input(1, "decode", 1, [1], hidden)
    try:
        reply = await blocking(client.call, frame, 5.0)
        assert reply_fields(reply.payload)["op"] == "logits"
    finally:
        client.close()


async def test_a_dead_peer_fails_the_call_at_once(served) -> None:
    _, server, _ = served
    client = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", server.grant("b"))
    started = time.monotonic()
    with pytest.raises(tl.LinkError, match="went down"):
        await blocking(client.call, BinaryFrame(TENSOR, 1, {}, b""), 30.0, lambda: False)
    assert time.monotonic() - started < 5
    with pytest.raises(tl.LinkError, match="closed"):  # a failed link stays failed
        await blocking(client.call, BinaryFrame(TENSOR, 2, {}, b""), 30.0)


async def test_a_cut_link_is_replanned_with_the_same_tokens(served, expected: list[int]) -> None:
    _, server, links = served
    loop, config = asyncio.get_running_loop(), gguf_model().config
    calls = 0
    original = StageHost._link_frame

    def cut_after_two(self: StageHost, link: tls.ServerLink, frame: BinaryFrame) -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            server.drop_peer("b")  # the link goes down while this call is in flight
        return original(self, link, frame)

    def rebuild(excluded: frozenset[str]) -> list[RemoteStage]:
        assert excluded == {"b"}
        return [RemoteStage(links["a"], loop, MODEL, config, LayerSpan(0, 30))]

    stages = [RemoteStage(links["a"], loop, MODEL, config, LayerSpan(0, 15)),
              RemoteStage(links["b"], loop, MODEL, config, LayerSpan(15, 30), direct=True)]
    StageHost._link_frame = cut_after_two  # type: ignore[method-assign]
    pipeline = SplitPipeline(config, stages, rebuild)
    try:
        assert await blocking(greedy, pipeline, chat_ids(PROMPT), TOKENS, 4) == expected
        assert [r.lost for r in pipeline.replans] == ["b"]
    finally:
        StageHost._link_frame = original  # type: ignore[method-assign]
        await blocking(pipeline.close)


async def test_idle_connections_cannot_pile_up() -> None:
    host = StageHost(factory, gate_open)
    # handshakes that outlast the test: a connection closed now was refused for the limit, not timed out
    server = tls.TensorLinkServer(host.serve_link, SplitConfig(link_handshake_timeout_s=600.0))
    server.start("127.0.0.1")
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
            for _ in range(tls.MAX_HANDSHAKES)]
    try:
        await until(lambda: server.handshakes == tls.MAX_HANDSHAKES, "every idle connection holds a slot")
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        assert extra.recv(10) == b""  # closed unread
        extra.close()
        for sock in idle:
            sock.close()
        client = await connect_when_free(server, "b")  # the handshakes see their peers gone: slots free
        client.close()
    finally:
        for sock in idle:
            sock.close()
        server.stop()
        await host.stop()


async def until(condition: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
    """Poll `condition` until it holds (fails the test after `within_s`)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


def test_close_from_another_thread_ends_a_waiting_call() -> None:
    key, token = os.urandom(32), os.urandom(tl.TOKEN_BYTES)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def silent_stage() -> None:  # takes the token, accepts, then never answers
        sock, _ = listener.accept()
        accepted.append(sock)
        sock.recv(tl.TOKEN_BYTES)
        sock.sendall(tl.Sealer(key, tl.TO_ORIGIN).seal(b""))

    threading.Thread(target=silent_stage, daemon=True).start()
    grant = {"port": listener.getsockname()[1], "token": token.hex(), "key": key.hex()}
    client = tl.TensorLinkClient.connect("127.0.0.1", grant)
    threading.Timer(0.3, client.close).start()
    started = time.monotonic()
    try:
        with pytest.raises(tl.LinkError):
            client.call(BinaryFrame(TENSOR, 1, {}, b""), 30.0)
        assert time.monotonic() - started < 5
        client.close()  # idempotent
    finally:
        listener.close()
        for sock in accepted:
            sock.close()


async def test_links_per_peer_are_bounded(served, monkeypatch) -> None:
    _, server, _ = served
    monkeypatch.setattr(tls, "MAX_LINKS_PER_PEER", 2)
    first = [await blocking(tl.TensorLinkClient.connect, "127.0.0.1", server.grant("b")) for _ in range(2)]
    with pytest.raises(tl.LinkError):
        await blocking(tl.TensorLinkClient.connect, "127.0.0.1", server.grant("b"))
    other = await blocking(tl.TensorLinkClient.connect, "127.0.0.1", server.grant("c"))  # another peer may
    for client in [*first, other]:
        client.close()
    again = await connect_when_free(server, "b")  # the worker sees them closed and frees them
    again.close()


class UnreachablePeerLink(DirectPeerLink):
    """b grants direct links, but nothing answers at the granted port (as b's address across a NAT)."""

    def __init__(self, host: StageHost, peer_id: str, server: tls.TensorLinkServer) -> None:
        super().__init__(host, peer_id, server)
        self.grants = 0
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            self.closed_port = probe.getsockname()[1]

    async def request(self, frame_type: str, body: dict[str, Any], timeout_s: float | None = None) -> dict:
        if frame_type == tl.TENSOR_LINK:
            self.grants += 1
            return {**self.server.grant(self.peer_id), "port": self.closed_port}
        return await super().request(frame_type, body, timeout_s)


async def test_an_unreachable_direct_address_is_not_retried_while_recent(served) -> None:
    hosts, server, _ = served
    link = UnreachablePeerLink(hosts["b"], "b", server)
    loop, config = asyncio.get_running_loop(), gguf_model().config
    now = [100.0]
    failures = DirectLinkFailures(60.0, clock=lambda: now[0])

    async def open_stage() -> RemoteStage:
        stage = RemoteStage(link, loop, MODEL, config, LayerSpan(15, 30), direct=True,
                            direct_failures=failures)
        await blocking(stage.add_sequence, 5)
        await blocking(stage.remove_sequence, 5)
        await blocking(stage.close)
        return stage

    assert (await open_stage()).transport == "channel" and link.grants == 1  # tried, refused: the channel
    assert failures.recent("b", "127.0.0.1")
    assert (await open_stage()).transport == "channel" and link.grants == 1  # not tried again
    now[0] += 61.0
    assert not failures.recent("b", "127.0.0.1")
    assert (await open_stage()).transport == "channel" and link.grants == 2  # tried again after hold_s
    assert failures.recent("b", "127.0.0.1") and not failures.recent("c", "127.0.0.1")
