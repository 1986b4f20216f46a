"""Membership and signalling security against a real node process, and protocol abuse over a real link."""

from __future__ import annotations

import base64
import json

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shoal.mesh.p2p.ice import rtc_configuration
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.p2p.invite import Invite
from shoal.mesh.p2p.signalling import Membership, build_signal

from tests.mesh.mesh_nodes import Node, free_port, wait_until

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("meshsec")
    invite = Invite.create("sec")
    allowed = Identity.load_or_create(base / "allowed", name="allowed")
    hub = Node(
        "hub",
        base / "hub",
        f"127.0.0.1:{free_port()}",
        ["--invite", invite.to_token(), "--ice", "lo", "--no-mdns", "--allow", allowed.peer_id],
    ).start()
    nodes = [hub]
    try:
        yield {"hub": hub, "invite": invite, "base": base, "allowed": allowed, "nodes": nodes}
    finally:
        for node in nodes:
            node.kill(15)


def test_node_without_the_secret_is_refused_before_any_channel(mesh):
    hub = mesh["hub"]
    outsider = Node(
        "outsider",
        mesh["base"] / "outsider",
        f"127.0.0.1:{free_port()}",
        ["--invite", Invite.create("other").to_token(), "--ice", "lo", "--no-mdns", "--bootstrap", hub.api],
    ).start()
    mesh["nodes"].append(outsider)
    refused = wait_until(
        lambda: [r for r in hub.get("/v1/mesh/peers")["refused"] if r["from"] == outsider.peer_id],
        20,
        "refusal",
    )
    assert "mesh" in refused[0]["reason"]
    assert outsider.peer_id not in hub.peers()
    assert hub.peer_id not in outsider.peers()
    outsider.kill(15)


def test_allow_listed_node_without_secret_is_admitted(mesh):
    hub = mesh["hub"]
    allowed = Node(
        "allowed",
        mesh["base"] / "allowed",
        f"127.0.0.1:{free_port()}",
        ["--allow", hub.peer_id, "--ice", "lo", "--no-mdns", "--bootstrap", hub.api],
    ).start()
    mesh["nodes"].append(allowed)
    assert allowed.peer_id == mesh["allowed"].peer_id
    wait_until(lambda: allowed.peer_id in hub.peers(), 20, "allow-listed link")
    allowed.kill(15)


async def _offer_sdp() -> str:
    pc = RTCPeerConnection(rtc_configuration())
    pc.createDataChannel("control", negotiated=True, id=0)
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def _send(hub: Node, signal: dict) -> dict:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://{hub.api}/v1/mesh/signal") as ws,
    ):
        await ws.send_json({"op": "offer", "signal": signal})
        return await ws.receive_json(timeout=15)


def _tamper_fingerprint(sdp: str) -> str:
    lines = sdp.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("a=fingerprint:sha-256 "):
            last = line[-1]
            lines[i] = line[:-1] + ("0" if last != "0" else "1")
            break
    return "\r\n".join(lines) + "\r\n"


async def test_tampered_fingerprint_forged_signature_and_replay_are_refused(mesh):
    hub, invite = mesh["hub"], mesh["invite"]
    me = Identity.generate("tester")
    membership = Membership(secret=invite.secret)
    sdp = await _offer_sdp()

    good = build_signal(me, membership, "offer", sdp)
    tampered = {**good, "sdp": _tamper_fingerprint(sdp)}
    reply = await _send(hub, tampered)
    assert reply["op"] == "refused" and "signature" in reply["reason"]

    # a sender that re-signs a tampered SDP but keeps the old fingerprint list is caught by the fp check
    liar = build_signal(me, membership, "offer", _tamper_fingerprint(sdp))
    liar["fp"] = good["fp"]
    liar.pop("sig")
    from shoal.mesh.p2p.signalling import _canonical

    liar["sig"] = base64.b64encode(me.sign(_canonical(liar))).decode()
    reply = await _send(hub, liar)
    assert reply["op"] == "refused"

    # forged: claims to be another node (whose key we do not have)
    victim = Identity.generate("victim")
    forged = {**build_signal(me, membership, "offer", sdp), "from": victim.peer_id}
    reply = await _send(hub, forged)
    assert reply["op"] == "refused" and "signature" in reply["reason"]

    # the genuine offer is answered (signed by the hub), and replaying it is refused
    reply = await _send(hub, good)
    assert reply["op"] == "answer", reply
    assert reply["signal"]["from"] == hub.peer_id and reply["signal"]["re"] == good["nonce"]
    reply = await _send(hub, good)
    assert reply["op"] == "refused" and "replayed" in reply["reason"]

    # every refusal is logged on the hub with the claimed sender
    refused = hub.get("/v1/mesh/peers")["refused"]
    assert {r["from"] for r in refused} >= {me.peer_id, victim.peer_id}


frames = st.one_of(
    st.binary(max_size=300).map(lambda b: ("control", b.hex(), True)),
    st.text(max_size=200).map(lambda t: ("control", t, False)),
    st.binary(max_size=300).map(lambda b: ("blocks", b.hex(), True)),
    st.binary(min_size=16, max_size=64).map(lambda b: ("tensors", (b"SF\x01\x10" + b).hex(), True)),
    st.just(("control", json.dumps({"v": 1, "t": "ping", "b": {"pad": "x" * 5000}}), False)),
)


@pytest.fixture(scope="module")
def evil(mesh):
    hub = mesh["hub"]
    node = Node(
        "evil",
        mesh["base"] / "evil",
        f"127.0.0.1:{free_port()}",
        ["--invite", mesh["invite"].to_token(), "--ice", "lo", "--no-mdns", "--bootstrap", hub.api],
    ).start()
    mesh["nodes"].append(node)
    wait_until(lambda: node.peer_id in hub.peers(), 20, "evil link")
    return node


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(frames, min_size=1, max_size=3))
def test_fuzzed_frames_never_crash_the_node(mesh, evil, batch):
    hub = mesh["hub"]
    for channel, data, binary in batch:
        evil.post("/test/raw", {"peer": hub.peer_id, "channel": channel, "frames": [data], "binary": binary})
    assert hub.get("/v1/mesh/peers")["self"]["id"] == hub.peer_id
    assert hub.process.poll() is None


def test_abuser_is_banned_and_stays_out(mesh, evil):
    hub = mesh["hub"]
    if evil.peer_id in hub.peers():
        evil.post("/test/raw", {"peer": hub.peer_id, "channel": "control", "frames": ["garbage"] * 6})
    wait_until(lambda: evil.peer_id in hub.get("/v1/mesh/peers")["banned"], 20, "ban")
    wait_until(lambda: evil.peer_id not in hub.peers(), 20, "link closed")
    # the evil node keeps redialling its bootstrap address; the hub refuses it while the ban lasts
    wait_until(
        lambda: any(
            r["from"] == evil.peer_id and "banned" in r["reason"]
            for r in hub.get("/v1/mesh/peers")["refused"]
        ),
        20,
        "refused redial",
    )
    assert evil.peer_id not in hub.peers()
    assert hub.process.poll() is None
