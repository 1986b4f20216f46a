"""A chain across three real node processes on loopback (NumPy backend; `split.stage_chain`): every node
offers direct tensor links, so a 3-stage split's decode steps go a → b → c → a, b linking to c itself over a
grant it asks c for on the mesh. Greedy output equals local, the steps really skip the origin, and the stream
survives `kill -9` of either chained stage with the undisturbed text.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.mesh.mesh_nodes import wait_until
from tests.mesh.split_nodes import SplitNode, start_nodes

pytestmark = pytest.mark.timeout(400)

PROMPT = "What is the capital of France?"
PROMPTS = [PROMPT, "Name a primary colour.", "What do bees make?"]
TOKENS = 10


@pytest.fixture(scope="module")
def mesh3(tmp_path_factory):
    base = tmp_path_factory.mktemp("chain3")
    secret = os.urandom(32).hex()
    a = SplitNode("a", base / "a", {})
    b = SplitNode("b", base / "b", {"mesh": {"bootstrap": [a.api]}})
    c = SplitNode("c", base / "c", {"mesh": {"bootstrap": [a.api]}})
    nodes = [a, b, c]
    start_nodes(nodes, secret)
    try:
        wait_until(lambda: {b.peer_id, c.peer_id} <= set(a.peers()) and c.peer_id in b.peers(), 60,
                   "a, b and c linked")
        yield a, b, c, secret
    finally:
        for node in nodes:
            node.kill(15)


def three_stages(a: SplitNode, b: SplitNode, c: SplitNode) -> None:
    a.force("split", ("local", "0:10"), (b.peer_id, "10:20"), (c.peer_id, "20:30"))


def stage_steps(node: SplitNode) -> dict:
    return node.call("GET", "/v1/mesh/route")["stage_steps"]


def test_a_chained_split_equals_local_and_skips_the_origin(mesh3):
    a, b, c, _ = mesh3
    a.force("local")
    want = a.chat(PROMPT, TOKENS)["choices"][0]["message"]["content"]
    three_stages(a, b, c)
    before = [stage_steps(node) for node in (b, c)]
    reply = a.chat(PROMPT, TOKENS)
    assert reply["choices"][0]["message"]["content"] == want
    timing = {t["peer"]: t for t in reply["shoal_route"]["stage_timing"]}
    assert [t["link"] for t in timing.values()] == ["local", "direct", "direct"]
    # b was called by a for the prefill only; c answered every decode step, which b passed on to it
    assert timing[b.peer_id]["calls"] == 1, timing
    steps = reply["usage"]["completion_tokens"] - 1
    assert steps >= 3 and timing[c.peer_id]["chained"] == timing[c.peer_id]["calls"] - 1 == steps, timing
    # b and c took every greedy step after the first (which armed the lane) natively (`split.step_lane`)
    for node, earlier in zip((b, c), before, strict=True):
        after = stage_steps(node)
        assert after["native_lane"] == "on", after
        assert after["computed"] - earlier["computed"] == steps + 1, (earlier, after)  # and the prefill
        assert after["native"] - earlier["native"] == steps - 1, (earlier, after)
    a.force(None)


def test_concurrent_chained_requests_share_the_links(mesh3):
    """Three requests at once: three chains through the same b → c link (c reads their steps back to back)
    and each answer on its own origin link."""
    a, b, c, _ = mesh3
    a.force("local")
    want = {p: a.chat(p, TOKENS)["choices"][0]["message"]["content"] for p in PROMPTS}
    three_stages(a, b, c)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: a.chat(p, TOKENS), PROMPTS))
    for prompt, reply in zip(PROMPTS, replies, strict=True):
        assert reply["choices"][0]["message"]["content"] == want[prompt], reply
        route = reply["shoal_route"]
        assert route["replans"] == 0, route
        assert {t["peer"]: t for t in route["stage_timing"]}[c.peer_id]["chained"] >= 1, route
    a.force(None)


@pytest.mark.parametrize("victim", ["b", "c"])
def test_kill_a_chained_stage_mid_generation(mesh3, victim: str):
    """kill -9 of b (the step's first hop) or c (the one answering a); a killed node is started again."""
    a, b, c, secret = mesh3
    killed = {"b": b, "c": c}[victim]
    for node in (b, c):
        if node.process is None or node.process.poll() is not None:
            node.launch(secret).wait_ready()
    wait_until(lambda: {b.peer_id, c.peer_id} <= set(a.peers()) and c.peer_id in b.peers(), 60,
               "a, b and c linked again")
    a.force("local")
    want = a.chat(PROMPT, TOKENS)["choices"][0]["message"]["content"]
    three_stages(a, b, c)
    parts: list[str] = []
    final = None
    for chunk in a.chat_stream(PROMPT, TOKENS):
        choice = chunk["choices"][0]
        parts.append(choice["delta"].get("content") or "")
        if sum(1 for p in parts if p) == 3 and killed.process is not None and killed.process.poll() is None:
            killed.process.kill()  # SIGKILL: no goodbye
        if choice.get("finish_reason"):
            final = chunk
    killed.kill()
    assert "".join(parts) == want
    assert final is not None
    route = final["shoal_route"]
    assert route["replans"] >= 1 and killed.peer_id not in route["peers"], route
    assert route["replan_log"][0]["lost"] == killed.peer_id, route
    a.force(None)
