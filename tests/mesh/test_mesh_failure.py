"""A peer killed with SIGKILL is dropped by heartbeat timeout and relinks when it comes back; dials that cross
leave one link."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from shoal.mesh.p2p.invite import Invite

from tests.mesh.mesh_nodes import Node, free_port, wait_until

pytestmark = pytest.mark.timeout(150)


def test_killed_peer_is_dropped_and_relinks_on_return(tmp_path):
    token = Invite.create("fail").to_token()
    common = ["--invite", token, "--ice", "lo", "--no-mdns", "--heartbeat", "0.5", "--dead-timeout", "3"]
    n1 = Node("n1", tmp_path / "n1", f"127.0.0.1:{free_port()}", common).start()
    n2 = Node("n2", tmp_path / "n2", f"127.0.0.1:{free_port()}", [*common, "--bootstrap", n1.api]).start()
    nodes = [n1, n2]
    try:
        wait_until(lambda: n2.peer_id in n1.peers() and n1.peer_id in n2.peers(), 30, "link")
        old_id = n2.peer_id

        # kill -9 the joiner: no bye, no SCTP shutdown; only our heartbeats can notice
        n2.kill()
        wait_until(lambda: old_id not in n1.peers(), 20, "n1 drops n2")
        departed = [d for d in n1.get("/v1/mesh/peers")["departed"] if d["id"] == old_id]
        assert departed and departed[-1]["reason"].startswith("dead"), departed

        # it comes back with the same identity and address and dials its bootstrap again
        n2.start()
        assert n2.peer_id == old_id
        wait_until(lambda: n2.peer_id in n1.peers(), 30, "n2 relinked")

        # now kill the bootstrap node itself; n2 keeps redialling its address until it is back
        n1.kill()
        wait_until(lambda: n1.peer_id not in n2.peers(), 20, "n2 drops n1")
        n1.start()
        wait_until(lambda: n1.peer_id in n2.peers() and n2.peer_id in n1.peers(), 40, "relinked to n1")
    finally:
        for node in nodes:
            node.kill(15)


def test_crossed_dials_leave_one_link_the_same_at_both_ends(tmp_path):
    """Two members dialling each other at once (a rejoin crossing a peer exchange's dial) make two links,
    which may open in either order at either end; both ends keep the one with the smaller offer nonce
    (`link_shared.keeps_existing_link`), so neither closes the link the other kept (that was a departure and
    a relink, again and again)."""
    token = Invite.create("crossed").to_token()
    common = ["--invite", token, "--ice", "lo", "--no-mdns"]
    nodes = [Node(f"n{i}", tmp_path / f"n{i}", f"127.0.0.1:{free_port()}", common).start() for i in range(2)]
    n1, n2 = nodes
    try:
        for _ in range(3):  # (each round's dials cross the link the last one kept, too)
            with ThreadPoolExecutor(2) as pool:  # each dials the other through its signalling endpoint
                dials = [pool.submit(a.post, f"/test/connect?address={b.api}", b"")
                         for a, b in (nodes, nodes[::-1])]
                answers = [dial.result() for dial in dials]
            assert [answer.get("peer") for answer in answers] == [n2.peer_id, n1.peer_id], answers
            # the kept link carries blocks both ways (a link the other end closed would fail or leave)
            for source, target in (nodes, nodes[::-1]):
                cid = source.post("/test/blocks", os.urandom(4096))["cid"]
                assert target.get(f"/test/mesh-block/{cid}?via=channel").get("size") == 4096
            for node, other in (nodes, nodes[::-1]):
                view = node.get("/v1/mesh/peers")
                assert [peer["id"] for peer in view["peers"]] == [other.peer_id], view["peers"]
                assert view["departed"] == [], view["departed"]
    finally:
        for node in nodes:
            node.kill(15)
