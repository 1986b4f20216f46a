"""Automatic placement across three real `shoal node` processes (NumPy backend, loopback), with the default
routing settings — no forced route, no per-request route, the default policy and `[split]` routing (warming
aside, below) — driven by the official `openai` client (max_retries=0).

Node a is a slow device: its CPU is capped to a third of one core from launch (`tests.cpu_cap`: a cgroup v1
cpu quota where writable, else a SIGSTOP/SIGCONT duty cycle). b and c are equal, uncapped. Every node
measures its own speed once its model loads (`split.speed_probe`) and advertises it. Warming for peers
(`[split] warm_peers_models`, `tests/mesh/test_warming_nodes.py`) is off: it only loaded a copy of the model
during the probes here, sharing the probed CPU (and a quarter-core cap made a's start, load and probe ~70 s
of the suite; at a third it measures well below b and c).

- A request at a is offloaded to b or c (whichever is predicted to finish first), with the tokens of a's own
  greedy run (`route: local` still forces local).
- Several requests at once at c spread: some go to its idle equal peer b.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import openai
import pytest
from shoal.mesh.commands.cli import main

from tests.cpu_cap import CpuCap
from tests.mesh.mesh_nodes import wait_until
from tests.mesh.split_nodes import MODEL
from tests.nodes import NodeProcess

pytestmark = pytest.mark.timeout(600)

QUESTION = [{"role": "user", "content": "List the planets of the solar system in order."}]
SLOW_FRACTION = 1 / 3


def advert(node: NodeProcess, of: NodeProcess | None = None) -> dict[str, Any]:
    """`of`'s advert as `node` last heard it (`node`'s own when `of` is None)."""
    if of is None:
        return node.get("/v1/mesh/route")["advert"]
    peers = {p["id"]: p for p in node.get("/v1/mesh/peers")["peers"] if p["state"] == "connected"}
    return peers[of.peer_id]["advert"]


def speed(node: NodeProcess, of: NodeProcess | None = None) -> float:
    """`of`'s measured decode tok/s for the model as `node` sees it (its own advert when `of` is None)."""
    return float(advert(node, of).get("speed", {}).get(MODEL, {}).get("decode_tok_s") or 0.0)


@pytest.fixture(scope="module")
def mesh3(tmp_path_factory):
    base = tmp_path_factory.mktemp("placement")
    secret = os.urandom(32).hex()
    env = {"OPENBLAS_NUM_THREADS": "1"}

    def settings(*bootstrap: NodeProcess) -> dict[str, Any]:
        mesh: dict[str, Any] = {"secret": secret, "gossip_interval_s": 1.0}
        if bootstrap:
            mesh["bootstrap"] = [n.api for n in bootstrap]
        return {"models": {"backend": "numpy"}, "mesh": mesh, "split": {"warm_peers_models": False}}

    b = NodeProcess("b", base / "b", settings(), env=env)
    c = NodeProcess("c", base / "c", settings(b), env=env)
    a = NodeProcess("a", base / "a", settings(b, c), env=env)
    nodes = [b, c, a]
    cap = CpuCap(0, SLOW_FRACTION)
    try:
        # b and c together (two cores, one each), then a: a's capped probe must not share the CPU with another
        # node's start (on real devices each has its own)
        for group in ([b, c], [a]):
            for node in group:
                node.launch()
                if node is a:
                    cap = CpuCap(a.process.pid, SLOW_FRACTION).start()  # type: ignore[union-attr]
            for node in group:
                node.wait_ready(180)
                wait_until(lambda n=node: speed(n) > 0, 240, f"{node.name}'s speed probe")

        def advertised() -> bool:
            return all(speed(x, y) > 0 for x, y in ((a, b), (a, c), (c, b), (c, a)))

        wait_until(advertised, 60, "the speeds advertised to a and c")
        yield a, b, c, cap
    finally:
        cap.stop()
        for node in nodes:
            node.stop(timeout_s=15)


def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="none", max_retries=0, timeout=180)


def ask(node: NodeProcess, max_tokens: int, **kw: Any) -> tuple[list[str], dict[str, Any], str]:
    """(tokens, shoal_route, x-shoal-route header) of a greedy chat completion."""
    raw = client(node).chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=max_tokens, temperature=0, logprobs=True, **kw)
    reply = raw.parse()
    tokens = [t.token for t in reply.choices[0].logprobs.content]
    return tokens, reply.model_extra["shoal_route"], raw.headers["x-shoal-route"]


def test_a_slow_node_offloads_to_a_fast_one_by_default(mesh3, capsys):
    a, b, c, cap = mesh3
    slow, fast = speed(a), {b.peer_id: speed(a, b), c.peer_id: speed(a, c)}
    assert slow < min(fast.values()), (cap.method, slow, fast)  # the cap shows in the measured speeds
    assert main(["peers", "--api", a.api]) == 0  # `shoal peers` shows each member's measured speed
    listing = capsys.readouterr().out
    assert "TOK/S" in listing and f"{fast[b.peer_id]:.1f}" in listing, listing
    local_tokens, local_route, header = ask(a, 8, extra_headers={"x-shoal-route": "local"})
    assert local_route["kind"] == "local" and header == "local", local_route
    tokens, route, header = ask(a, 8)  # default: the scheduler decides
    assert route["kind"] == "offload" and header == "offload", (route, slow, fast, cap.method)
    assert route["peers"][0] in fast, route
    assert tokens == local_tokens
    records = a.get("/v1/mesh/requests")["requests"]  # the node's own record of its requests
    assert [r["route"]["kind"] for r in records[-2:]] == ["local", "offload"], records[-2:]


def test_concurrent_requests_at_one_node_spread_to_an_idle_equal_peer(mesh3):
    a, b, c, _ = mesh3
    reference, route, _ = ask(c, 12, extra_headers={"x-shoal-route": "local"})
    assert route["kind"] == "local"
    # the premise, as c sees it: b idle — the previous test's offload to b may still show in b's last advert
    wait_until(lambda: advert(c, b).get("queue_depth", 0) == 0, 30, "b's advert at c showing it idle")
    results: list[tuple[list[str], dict[str, Any], str] | BaseException] = []

    def one() -> None:
        try:
            results.append(ask(c, 12))
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors and len(results) == 4, errors
    routes = [r[1] for r in results]  # type: ignore[index]
    remote = [r for r in routes if r["kind"] == "offload"]
    assert remote, [(r["kind"], r.get("peers"), r.get("predicted")) for r in routes]
    assert {r["peers"][0] for r in remote} <= {a.peer_id, b.peer_id}, routes
    assert any(r["peers"][0] == b.peer_id for r in remote), routes  # the equal peer, not the slow one
    assert all(r[0] == reference for r in results)  # type: ignore[index]
