"""The three-node assertions across network namespaces ("real" hosts on a bridge), as root.

Latency: `tc netem` where the kernel has it; otherwise (this CI kernel has no netem) the nodes delay their
own outgoing datagrams by 10 ms (`--delay-ms`, a hook in aioice's send path). Bandwidth: `tbf` 50 Mbit/s.
Discovery: n2 bootstraps from n1; n3 has no bootstrap at all and must be found through mDNS.
"""

from __future__ import annotations

import os

import pytest
from shoal.mesh.p2p.invite import Invite

from tests.mesh import netns
from tests.mesh.mesh_nodes import Node, full_mesh, wait_until

pytestmark = pytest.mark.timeout(150)
DELAY_MS = 10.0

_why_not = netns.available()


@pytest.fixture(scope="module")
def hosts():
    if _why_not:
        pytest.skip(f"network namespaces unavailable: {_why_not}")
    network = netns.HostNetwork(prefix=f"sh{os.getpid() % 100000}", hosts=3).setup("50mbit", DELAY_MS)
    try:
        yield network
    finally:
        network.close()


@pytest.fixture(scope="module")
def ns_nodes(hosts, tmp_path_factory):
    base = tmp_path_factory.mktemp("meshns")
    token = Invite.create("ns").to_token()
    delay = [] if hosts.netem else ["--delay-ms", str(DELAY_MS)]
    nodes: list[Node] = []
    try:
        for index, extra in enumerate([[], ["--bootstrap", f"{hosts.address(0)}:8740"], []]):
            node = Node(
                f"n{index + 1}",
                base / f"n{index + 1}",
                f"{hosts.address(index)}:8740",
                ["--invite", token, *delay, *extra],
                prefix=hosts.exec_prefix(index),
                http_prefix=hosts.exec_prefix(index),
            )
            nodes.append(node.start())
        yield nodes
    finally:
        for node in nodes:
            node.kill(15)


def test_full_mesh_across_namespaces_with_mdns(hosts, ns_nodes):
    n1, n2, n3 = ns_nodes
    print(f"latency emulated with {'tc netem' if hosts.netem else 'the in-process delay hook'}")
    wait_until(lambda: full_mesh(ns_nodes), 60, "full mesh across namespaces")
    # n3 was given no address at all: it can only have been found by mDNS (then exchange)
    assert {n1.peer_id, n2.peer_id} <= set(n3.peers())
    view = wait_until(
        lambda: (p := n1.peers().get(n3.peer_id)) and p["rtt_ms"] and p["advert"].get("name") and p,
        20,
        "rtt and advert",
    )
    assert view["advert"]["name"] == "n3"
    assert view["rtt_ms"] >= 1.5 * DELAY_MS  # the emulated latency is visible in the measured RTT


@pytest.mark.parametrize("via", ["http", "channel"])
def test_block_across_namespaces_is_verified(ns_nodes, via):
    _, n2, n3 = ns_nodes
    wait_until(lambda: full_mesh(ns_nodes), 60, "full mesh")
    data = os.urandom(200_000)
    cid = n2.post("/test/blocks", data)["cid"]
    result = n3.get(f"/test/mesh-block/{cid}" + ("?via=channel" if via == "channel" else ""), timeout=30)
    assert result.get("size") == len(data), result
    assert result["stats"].get(via, 0) >= 1
