"""Fuzzing what a peer can send: random and mutated frames fed to a link's decoder and dispatcher
(`Peer.receive`, the code behind every data-channel message) with the node's real handlers (discovery, gossip,
`mesh.key`); then a burst of malformed frames over a real data channel to a live `shoal node`, which must
still answer `/health`."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random

import pytest
from aiortc import RTCPeerConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.errors import ProtocolError
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.p2p.invite import Invite
from shoal.mesh.p2p.peer import LinkSettings, Peer
from shoal.mesh.p2p.service import MeshService

from tests.mesh.mesh_nodes import Node, free_port, wait_until

pytestmark = pytest.mark.timeout(300)
SOMEONE = Identity.generate("someone").peer_id
INVITE = Invite.create("fuzz")
ME = Identity.generate("me")
KEYS = [
    "t",
    "op",
    "to",
    "signal",
    "peers",
    "secret",
    "name",
    "rotate",
    "max_packet",
    "mtu",
    "code",
    "message",
    "models",
    "links",
    "id",
    "api",
    "nonce",
    "re",
    "via",
    "reason",
    "speed",
    "shards",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
    | st.sampled_from([SOMEONE, ME.peer_id, "127.0.0.1:1", base64.b64encode(b"k" * 32).decode(), "offer"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=16,
)
bodies = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)


def _valid_frames() -> list[bytes]:
    """Well-formed frames of every built-in type (the seeds that mutation starts from)."""
    secret = base64.b64encode(b"s" * 32).decode()
    frames = [
        p.ControlFrame("ping", {"t": 1.0}),
        p.ControlFrame("pong", {"t": 1.0}),
        p.ControlFrame("link", {"max_packet": 16384, "mtu": 65536}),
        p.ControlFrame("advert", {"name": "x", "models": ["m"], "links": {SOMEONE: 1.5}}),
        p.ControlFrame("peers", {"peers": [{"id": SOMEONE, "name": "s", "api": "127.0.0.1:9"}]}),
        p.ControlFrame("signal", {"op": "offer", "to": ME.peer_id, "signal": {"from": SOMEONE}}),
        p.ControlFrame(
            "signal", {"op": "refused", "to": ME.peer_id, "re": "ab", "reason": "no", "code": "x"}
        ),
        p.ControlFrame(
            "mesh.key", {"secret": secret, "name": "m", "rotate": True, "previous": INVITE.mesh_id}, id=3
        ),
        p.ControlFrame("reply", {"ok": True}, re=2),
        p.ControlFrame("error", {"code": "protocol", "message": "m"}),
    ]
    encoded = [p.encode_control(frame) for frame in frames]
    encoded += p.encode_binary(p.BinaryFrame(p.BLOCK_WANT, 5, {"cid": "bafy"}, b""), 4096)
    return encoded


SEEDS = _valid_frames()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if how == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


@st.composite
def structured(draw: st.DrawFn) -> str:
    message: dict = {
        "v": draw(st.just(1) | json_values),
        "t": draw(st.sampled_from(sorted(p.CONTROL_LIMITS)) | st.text(max_size=10)),
        "b": draw(bodies | json_values),
    }
    for key in ("id", "re"):
        if draw(st.booleans()):
            message[key] = draw(st.integers(-1, 2**33) | json_values)
    return json.dumps(message)


headers = st.builds(
    lambda version, kind, flags, meta, rid, index, rest: (
        p.HEADER.pack(p.MAGIC, version, kind, flags, meta, rid, index) + rest
    ),
    st.sampled_from([0, 1, 2]),
    st.sampled_from([*p.BINARY_KINDS, 0, 255]),
    st.integers(0, 255),
    st.integers(0, 70),
    st.integers(0, 2**32 - 1),
    st.integers(0, 3),
    st.binary(max_size=80),
)
messages = st.one_of(
    st.tuples(st.just(p.CONTROL), st.binary(max_size=200) | st.text(max_size=100)),
    st.tuples(st.just(p.CONTROL), structured()),
    st.tuples(st.just(p.CONTROL), mutated()),
    st.tuples(st.sampled_from([p.BLOCKS, p.TENSORS]), headers | st.binary(max_size=100) | mutated()),
    st.tuples(st.sampled_from([p.BLOCKS, p.TENSORS]), st.text(max_size=20)),
)


class Errors(logging.Handler):
    """Collects ERROR records of the mesh layer: a handler or task that failed on peer input."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    loop = asyncio.new_event_loop()
    invite = INVITE
    service = MeshService(
        MeshConfig(invite=invite.to_token(), mdns=False), ME, tmp_path_factory.mktemp("fuzz")
    )
    errors = Errors()
    logging.getLogger("shoal.mesh").addHandler(errors)
    state: dict = {"loop": loop, "service": service, "errors": errors, "peer": None}
    try:
        yield state
    finally:
        logging.getLogger("shoal.mesh").removeHandler(errors)
        if state["peer"] is not None:
            loop.run_until_complete(state["peer"].close("done"))
        loop.run_until_complete(_cancel_all(service))
        loop.close()


async def _cancel_all(service: MeshService) -> None:
    tasks = [task for task in service._tasks if task.get_loop() is asyncio.get_running_loop()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _new_peer(service: MeshService) -> Peer:
    settings_ = LinkSettings(abuse_limit=1000)
    peer = Peer(
        RTCPeerConnection(),
        SOMEONE,
        "fuzzer",
        True,
        settings_,
        service.handlers,
        lambda *a: None,
        lambda *a: None,
    )
    peer.state = "connected"  # as after `start()`, without heartbeats: replies fail as on a closed channel
    return peer


async def _feed(state: dict, admitted: str | None, batch: list[tuple[str, bytes | str]]) -> None:
    service: MeshService = state["service"]
    if state["peer"] is None or state["peer"].state == "closed":
        state["peer"] = _new_peer(service)
    peer: Peer = state["peer"]
    peer.admitted = admitted
    for channel, data in batch:
        try:
            peer.receive(channel, data)
        except ProtocolError:
            pass  # the coded error: the link counts a strike
    for _ in range(200):  # let the handlers the frames started finish
        await asyncio.sleep(0)
        if not peer._tasks and not service._tasks:
            break
    pending = [*peer._tasks, *service._tasks]
    if pending:
        await asyncio.wait(pending, timeout=5)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    admitted=st.sampled_from([None, "allow", "secret", "invite"]),
    batch=st.lists(messages, min_size=1, max_size=5),
)
def test_random_and_mutated_frames_raise_only_protocol_errors(rig, admitted, batch):
    rig["loop"].run_until_complete(_feed(rig, admitted, batch))
    failures = [
        f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
        for r in rig["errors"].records
    ]
    assert not failures, failures


def _garbage(seed: int, count: int) -> list[tuple[str, str]]:
    """Malformed frames (hex) for the control and blocks channels, reproducible."""
    rng = random.Random(seed)
    frames = []
    for i in range(count):
        seed_frame = bytearray(rng.choice(SEEDS))
        del seed_frame[rng.randrange(1, len(seed_frame)) :]
        noise = rng.randbytes(rng.randrange(0, 64))
        raw = bytes(seed_frame) + noise if i % 2 else noise + bytes(seed_frame)
        frames.append((p.CONTROL if i % 3 else p.BLOCKS, raw.hex()))
    return frames


def test_live_node_answers_health_after_a_burst_of_malformed_frames(tmp_path):
    from tests.mesh.test_mesh_node import ShoalNode

    invite = Invite.create("burst")
    api = f"127.0.0.1:{free_port()}"
    node = ShoalNode("target", tmp_path / "target", api, ["--join", invite.with_bootstrap((api,)).to_token()])
    evil = Node(
        "evil",
        tmp_path / "evil",
        f"127.0.0.1:{free_port()}",
        ["--invite", invite.to_token(), "--ice", "lo", "--no-mdns", "--bootstrap", api],
    )
    try:
        node.start()
        evil.start()
        wait_until(lambda: evil.peer_id in node.peers(), 40, "evil link")
        sent = 0
        for channel in (p.BLOCKS, p.CONTROL):
            frames = [data for ch, data in _garbage(11, 120) if ch == channel]
            reply = evil.post(
                "/test/raw", {"peer": node.peer_id, "channel": channel, "frames": frames, "binary": True}
            )
            sent += reply.get("sent", 0)
        assert sent > 0
        wait_until(lambda: evil.peer_id in node.get("/v1/mesh/peers")["banned"], 20, "ban of the sender")
        health = node.get("/health")
        assert health["status"] == "ok", health
        assert node.process.poll() is None and evil.peer_id not in node.peers()
    finally:
        evil.kill(15)
        node.kill(15)
