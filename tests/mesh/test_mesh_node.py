"""Real `shoal node` processes joined by invite: full mesh, `shoal peers`, and a file published on one node
and pulled by another through the mesh (the IPFS layer's fetcher with the "mesh peers" source)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shoal.mesh.p2p.invite import Invite

from tests.mesh.mesh_nodes import REPO, Node, free_port, full_mesh, wait_until
from tests.nodes import NodeProcess

pytestmark = pytest.mark.timeout(180)


class ShoalNode(Node):
    """A `shoal node --join INVITE` process started as a user would (`tests.nodes.NodeProcess`: a config
    file with the numpy backend, no model preload, loopback ICE, no mDNS), with `mesh_nodes.Node`'s HTTP
    helpers."""

    def start(self, timeout_s: float = 60.0) -> ShoalNode:
        host, port = self.api.rsplit(":", 1)
        node = NodeProcess(self.name, self.data_dir, {"models": {"backend": "numpy", "preload": False}},
                           args=self.args, host=host, port=int(port))
        node.start(timeout_s)
        self.process, self.peer_id, self.log_path = node.process, node.peer_id, node.log_path  # type: ignore[assignment]
        return self


@pytest.fixture(scope="module")
def shoal_nodes(tmp_path_factory):
    base = tmp_path_factory.mktemp("shoalnodes")
    apis = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    token = Invite.create("nodes", (apis[0],)).to_token()  # everyone bootstraps from the first node
    nodes = [ShoalNode(f"n{i + 1}", base / f"n{i + 1}", api, ["--join", token]) for i, api in enumerate(apis)]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.kill(15)


def test_shoal_nodes_join_by_invite_and_reach_full_mesh(shoal_nodes):
    wait_until(lambda: full_mesh(shoal_nodes), 60, "full mesh of shoal nodes")
    n1, n2, _ = shoal_nodes
    view = n1.peers()[n2.peer_id]
    assert view["name"] == "n2" and view["api"] == n2.api
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from shoal.mesh.commands.cli import main; sys.exit(main())",
            "peers",
            "--api",
            n1.api,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "SHOAL_CONFIG": os.devnull},
    )
    assert result.returncode == 0, result.stderr
    assert "n2" in result.stdout and "n3" in result.stdout


def test_file_published_on_one_node_is_pulled_through_the_mesh(shoal_nodes, tmp_path):
    wait_until(lambda: full_mesh(shoal_nodes), 60, "full mesh")
    _, n2, n3 = shoal_nodes
    content = os.urandom(700_000)
    cid = n2.post("/v1/models/publish?name=meshfile&filename=weights.bin", content)["cid"]  # an upload
    accepted = n3.post("/v1/models/pull", {"model": cid})
    assert accepted.get("cid") == cid, accepted

    def pulled() -> Path | None:
        entry = next((m for m in n3.get("/v1/ipfs/models")["models"] if m["cid"] == cid), None)
        return Path(entry["path"]) if entry and entry["complete"] and entry["path"] else None

    path = wait_until(pulled, 60, "pull finished on n3")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(content).hexdigest()


def test_mesh_events_on_the_node_event_stream(shoal_nodes):
    import json
    import threading
    import urllib.request

    wait_until(lambda: full_mesh(shoal_nodes), 60, "full mesh")
    n1, _, n3 = shoal_nodes
    seen: list[dict] = []
    subscribed = threading.Event()

    def listen() -> None:
        try:
            with urllib.request.urlopen(f"http://{n1.api}/v1/events", timeout=60) as stream:
                subscribed.set()
                for raw in stream:
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        seen.append(json.loads(line[5:]))
                        if seen[-1]["kind"] == "peer.joined" and seen[-1]["data"]["id"] == n3.peer_id:
                            return
        except OSError:
            return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert subscribed.wait(30), "the event stream did not open"  # n1 subscribes before it answers
    n3.kill(15)  # graceful: says bye, so n1 sees it leave at once
    wait_until(
        lambda: any(e["kind"] == "peer.left" and e["data"]["id"] == n3.peer_id for e in seen),
        30,
        "peer.left event",
    )
    n3.start()
    wait_until(
        lambda: any(e["kind"] == "peer.joined" and e["data"]["id"] == n3.peer_id for e in seen),
        60,
        "peer.joined event",
    )
    assert n3.peer_id in n1.peers()
    left = next(e for e in seen if e["kind"] == "peer.left" and e["data"]["id"] == n3.peer_id)
    assert left["data"]["reason"] == "peer said bye"
