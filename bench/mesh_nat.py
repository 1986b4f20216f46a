"""The across-NAT rows of bench/mesh_link.py: RTT and block throughput over a link hole-punched through two
cone NATs (server-reflexive) and over one relayed through TURN (one home behind a symmetric NAT), each against
a host link between two public members measured in the same topology and run.

    python bench/mesh_link.py --nat-only [--rtt-count 200] [--blocks 32] [--block-size 262144] [--repeat 3]

Uses tests/mesh/nat_netns.py's network namespaces (root, iptables, coturn); without them `rows` returns the
reason and mesh_link.py prints it instead of the rows. Every node is a mesh harness process started with
`--bench` (bench/mesh_link.py's routes); the HTTP calls run curl inside the namespaces. Only documentation
address ranges, only inside the namespaces.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.mesh import nat_netns
from tests.mesh.mesh_nodes import Node, wait_until

STUN = f"stun:{nat_netns.SERVER}:{nat_netns.TURN_PORT}"
TURN = f"turn:{nat_netns.SERVER}:{nat_netns.TURN_PORT}"
PORT = 8740
LINKS = {"cone": "direct, two cone NATs", "symmetric": "relayed, TURN (symmetric NAT)"}


def _start(network: nat_netns.NatNetwork, base: Path) -> dict[str, Node]:
    """pub and pub2 (public hosts), home1 (cone) and home2 (the NAT under test); all bootstrap from pub."""
    token_args = ["--secret", os.urandom(32).hex(), "--no-mdns", "--bench", "--bench-redial", "--stun", STUN,
                  "--turn", TURN, "--turn-username", "shoal", "--turn-password", "shoal-pass"]
    public = f"{nat_netns.PUBLIC_HOST}:{PORT}"
    pub2 = network.add_public_host(1)
    plan = [("pub", network.public_host, public, []),
            ("pub2", pub2, f"203.0.113.3:{PORT}", ["--bootstrap", public]),
            ("home1", network.home(1), f"{network.home_address(1)}:{PORT}", ["--bootstrap", public]),
            ("home2", network.home(2), f"{network.home_address(2)}:{PORT}", ["--bootstrap", public])]
    nodes: dict[str, Node] = {}
    try:
        for name, namespace, api, extra in plan:
            prefix = network.exec_prefix(namespace)
            nodes[name] = Node(name, base / name, api, [*token_args, *extra], prefix=prefix,
                               http_prefix=prefix).start()
    except BaseException:
        for node in nodes.values():
            node.kill(15)
        raise
    return nodes


def _path(client: Node, server: Node) -> dict | None:
    view = client.peers().get(server.peer_id)
    return view["path"] if view and view.get("path") else None


def _measure(client: Node, server: Node, args: argparse.Namespace) -> dict[str, Any]:
    """RTT of 1 KiB control frames, and blocks over the client's data channel to `server`, 8 in flight."""
    rtt = client.get(f"/bench/rtt?peer={server.peer_id}&channel=control&size=1024&count={args.rtt_count}",
                     timeout=300)
    cids = [server.post("/test/blocks", os.urandom(args.block_size))["cid"] for _ in range(args.blocks)]
    body = {"cids": cids, "via": "channel", "peers": [server.peer_id], "concurrency": 8}
    runs = [client.post("/bench/pull", body, timeout=600) for _ in range(max(1, args.repeat))]
    for run in runs:
        if "mib_s" not in run:
            raise RuntimeError(f"block pull failed: {run}")
    speeds = [run["mib_s"] for run in runs]
    chunk = client.peers()[server.peer_id].get("sctp_chunk")
    return {"path": _path(client, server), "sctp_chunk": chunk, "rtt_median_ms": rtt["median_ms"],
            "rtt_p99_ms": rtt["p99_ms"],
            "blocks_mib_s": statistics.median(speeds), "runs_mib_s": [round(s, 1) for s in speeds]}


def _topology(kind: str, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    network = nat_netns.NatNetwork(prefix=f"bn{os.getpid() % 100000}").setup("cone", kind)
    nodes: dict[str, Node] = {}
    try:
        network.start_turn(base)
        nodes = _start(network, base)
        home1, home2 = nodes["home1"], nodes["home2"]

        def linked() -> bool:
            path = _path(home1, home2)
            wanted = "relayed" if kind == "symmetric" else "server-reflexive"
            return bool(path and path["type"] == wanted and _path(nodes["pub2"], nodes["pub"]))

        wait_until(linked, 90, f"home1 and home2 linked ({kind} NAT) and pub2 linked to pub")
        time.sleep(1.0)  # let the replaced duplicate links close before measuring
        return {"host": _measure(nodes["pub2"], nodes["pub"], args), kind: _measure(home1, home2, args)}
    finally:
        for node in nodes.values():
            node.kill(15)
        network.close()


def rows(args: argparse.Namespace) -> dict[str, Any] | str:
    """`{"cone": {"host": row, "cone": row}, "symmetric": {...}}`, or why the rows cannot be measured here."""
    why = nat_netns.available()
    if why:
        return why
    results: dict[str, Any] = {}
    for kind in LINKS:
        with tempfile.TemporaryDirectory(prefix=f"mesh-nat-{kind}-") as base:
            results[kind] = _topology(kind, args, Path(base))
    return results


def print_rows(results: dict[str, Any] | str) -> None:
    if isinstance(results, str):
        print(f"NAT rows skipped: {results}")
        return
    header = f"{'link (NAT topology; RTT of 1 KiB on control)':64} {'RTT median / p99':>18}"
    print(f"{header} {'blocks, 8 in flight':>22}")
    for kind, label in LINKS.items():
        for key, name in ((kind, label), ("host", "  vs host link, 2 public members")):
            row = results[kind][key]
            path = row["path"] or {}
            title = f"{name} [{path.get('type')}/{path.get('protocol')}, {row['sctp_chunk']} B]"
            rtt = f"{row['rtt_median_ms']:.2f} / {row['rtt_p99_ms']:.2f} ms"
            runs = " ".join(f"{v:.0f}" for v in row["runs_mib_s"])
            print(f"{title:64} {rtt:>18} {row['blocks_mib_s']:>12.1f} MiB/s ({runs})")
