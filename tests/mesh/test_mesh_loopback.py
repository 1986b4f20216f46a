"""Three real node processes on loopback: invite, bootstrap, peer exchange, full mesh, adverts, blocks."""

from __future__ import annotations

import hashlib
import os

import pytest
from shoal.mesh.ipfs.cid import RAW, make_cid
from shoal.mesh.p2p.invite import Invite

from tests.mesh.mesh_nodes import Node, free_port, full_mesh, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    base = tmp_path_factory.mktemp("mesh3")
    token = Invite.create("test").to_token()
    common = ["--invite", token, "--ice", "lo", "--no-mdns"]
    first = Node("n1", base / "n1", f"127.0.0.1:{free_port()}", common).start()
    others = [
        Node(f"n{i}", base / f"n{i}", f"127.0.0.1:{free_port()}", [*common, "--bootstrap", first.api]).start()
        for i in (2, 3)
    ]
    nodes = [first, *others]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.kill(15)


def test_three_nodes_reach_full_mesh_via_bootstrap_and_exchange(three_nodes):
    n1, n2, n3 = three_nodes
    wait_until(lambda: full_mesh(three_nodes), 40, "full mesh")
    # n2 and n3 only knew n1: their link came from peer exchange (offers relayed through n1)
    assert n3.peer_id in n2.peers() and n2.peer_id in n3.peers()

    def edges():
        topology = n1.get("/v1/mesh/topology")
        return {frozenset((e["a"], e["b"])) for e in topology["links"]}, topology

    # n1 learns the n2-n3 link from their adverts
    wait_until(lambda: frozenset((n2.peer_id, n3.peer_id)) in edges()[0], 20, "n2-n3 edge in n1's topology")
    topology = edges()[1]
    assert len(topology["nodes"]) == 3
    # n1's own links say what they are (loopback: host to host); the n2-n3 link is known by its RTT only
    types = {frozenset((e["a"], e["b"])): e["type"] for e in topology["links"]}
    assert types[frozenset((n1.peer_id, n2.peer_id))] == "host"
    assert types[frozenset((n2.peer_id, n3.peer_id))] is None


def test_adverts_and_rtt_exchanged(three_nodes):
    n1, n2, _ = three_nodes
    wait_until(lambda: full_mesh(three_nodes), 40, "full mesh")
    view = wait_until(
        lambda: (p := n1.peers().get(n2.peer_id)) and p["advert"].get("name") and p, 20, "advert"
    )
    assert view["advert"]["name"] == "n2"
    assert view["advert"]["api"] == n2.api
    assert view["advert"]["free_memory"] > 0
    assert view["advert"]["gateway"] is True
    assert any(address.startswith("127.0.0.1:") for address in view["addresses"]), view["addresses"]
    wait_until(lambda: n1.peers()[n2.peer_id]["rtt_ms"] is not None, 10, "rtt")


@pytest.mark.parametrize("via", ["http", "channel"])
def test_block_pulled_from_a_peer_is_verified(three_nodes, via):
    _, n2, n3 = three_nodes
    wait_until(lambda: full_mesh(three_nodes), 40, "full mesh")
    data = os.urandom(300_000)  # larger than one data-channel message: exercises chunking
    cid = n2.post("/test/blocks", data)["cid"]
    query = "?via=channel" if via == "channel" else ""
    result = n3.get(f"/test/mesh-block/{cid}{query}", timeout=30)
    assert result.get("size") == len(data), result
    assert result["stats"].get(via, 0) >= 1


def test_block_nobody_has_is_reported_missing(three_nodes):
    _, _, n3 = three_nodes
    wait_until(lambda: full_mesh(three_nodes), 40, "full mesh")
    cid = str(make_cid(b"a block nobody stored", RAW, 1))
    for via in ("", "?via=channel"):
        result = n3.post_get(f"/test/mesh-block/{cid}{via}")
        assert "BlockNotFoundError" in result["error"], result


@pytest.mark.parametrize("via", ["car", "channel"])
def test_file_dag_pulled_through_the_mesh_matches(three_nodes, tmp_path, via):
    _, n2, n3 = three_nodes
    wait_until(lambda: full_mesh(three_nodes), 40, "full mesh")
    content = os.urandom(1_200_000)  # several UnixFS leaves plus a dag-pb root
    source = tmp_path / f"file-{via}.bin"
    source.write_bytes(content)
    root = n2.post("/test/publish", {"path": str(source)})["cid"]
    result = n3.post("/test/mesh-pull", {"cid": root, "via": via}, timeout=60)
    assert result.get("sha256") == hashlib.sha256(content).hexdigest(), result
    assert result["size"] == len(content)
    if via == "car":
        assert result["stats"].get("car") == 1
    else:
        assert result["stats"].get("channel", 0) >= 5 and "http" not in result["stats"]


def test_unreachable_gateway_falls_back_to_the_data_channel(three_nodes, tmp_path):
    n1, _, n3 = three_nodes
    wait_until(lambda: full_mesh(three_nodes), 40, "full mesh")
    # this node announces an API address nobody listens on: its gateway is unreachable, its links are fine
    hidden = Node(
        "hidden",
        tmp_path / "hidden",
        f"127.0.0.1:{free_port()}",
        [
            "--invite",
            three_nodes[0].args[1],
            "--ice",
            "lo",
            "--no-mdns",
            "--bootstrap",
            n1.api,
            "--advertise",
            f"127.0.0.1:{free_port()}",
        ],
    ).start()
    try:
        wait_until(
            lambda: hidden.peer_id in n3.peers() and n3.peers()[hidden.peer_id]["advert"].get("gateway"),
            40,
            "hidden node linked and advertised",
        )
        data = os.urandom(100_000)
        cid = hidden.post("/test/blocks", data)["cid"]
        result = n3.get(f"/test/mesh-block/{cid}", timeout=30)
        assert result.get("size") == len(data), result
        assert result["stats"].get("channel", 0) >= 1
    finally:
        hidden.kill(15)
