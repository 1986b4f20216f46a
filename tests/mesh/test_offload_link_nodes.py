"""An offload's tokens over a direct link, between real node processes on loopback (NumPy backend).

a is the origin, b serves with direct links (the default). Offloaded to b, the tokens come over the link —
b's and a's token counters in `GET /v1/mesh/route` say so — the text equals a's local text, and the receipts
(in the done records) are countersigned and kept on both sides; `kill -9` of b mid-stream (its link resets)
is a lost peer, and the stream resumes on a with exactly the undisturbed text. The kill test runs last (it
removes b). A peer whose link cannot be made (no listener: `direct_tensors = false`) serving an offload over
the data channel with the local text: `test_split_nodes.py` (its b), and in process
`test_offload_link_fallback.py` (a node that does not take the link, a link cut before the first token).
"""

from __future__ import annotations

import os
import time

import pytest
from shoal.mesh.p2p.identity import Identity

from tests.mesh.mesh_nodes import wait_until
from tests.mesh.split_nodes import SplitNode, start_nodes
from tests.mesh.test_split_nodes import longest_gap

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["What is the capital of France?", "Say hello."]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    base = tmp_path_factory.mktemp("offload-link")
    secret = os.urandom(32).hex()
    for name in "ab":
        Identity.load_or_create(base / name, name=name)
    a = SplitNode("a", base / "a", {})
    b = SplitNode("b", base / "b", {"mesh": {"bootstrap": [a.api]}})
    started = [a, b]
    start_nodes(started, secret)
    try:
        def ready() -> bool:
            advert = a.peers().get(b.peer_id, {}).get("advert", {})
            return bool(advert.get("split", {}).get("serve_others"))

        wait_until(ready, 60, "a linked to b, with its advert")
        yield a, b
    finally:
        for node in started:
            node.kill(15)


@pytest.fixture(scope="module")
def expected(nodes) -> dict[str, str]:
    a, _ = nodes
    a.force("local")
    return {prompt: a.chat(prompt, MAX_TOKENS)["choices"][0]["message"]["content"] for prompt in PROMPTS}


def counters(node: SplitNode) -> dict[str, dict[str, int]]:
    return node.call("GET", "/v1/mesh/route")["offload_tokens"]


def receipts(node: SplitNode, peer: str, side: str) -> int:
    """Countersigned receipts `node` keeps of requests `peer` served for it (`received`) or it served for
    `peer` (`given`)."""
    return node.call("GET", "/v1/mesh/usage")["peers"].get(peer, {}).get(f"{side}_requests", 0)


def test_an_offloads_tokens_come_over_the_direct_link(nodes, expected):
    a, b = nodes
    before_a, before_b = counters(a), counters(b)
    kept_a, kept_b = receipts(a, b.peer_id, "received"), receipts(b, a.peer_id, "given")
    a.force("offload", (b.peer_id, "0:30"))
    for prompt in PROMPTS:
        reply = a.chat(prompt, MAX_TOKENS)
        assert reply["shoal_route"]["kind"] == "offload" and reply["shoal_route"]["replans"] == 0, reply
        assert reply["choices"][0]["message"]["content"] == expected[prompt]
        assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    after_a, after_b = counters(a), counters(b)
    sent = len(PROMPTS) * MAX_TOKENS
    assert after_a["received"]["direct"] - before_a["received"]["direct"] == sent, (before_a, after_a)
    assert after_a["received"]["channel"] == before_a["received"]["channel"]
    assert after_b["sent"]["direct"] - before_b["sent"]["direct"] == sent, (before_b, after_b)
    assert after_b["sent"]["channel"] == before_b["sent"]["channel"]
    # the receipts came in the done records over the link, were countersigned and kept on both sides
    wait_until(lambda: receipts(a, b.peer_id, "received") == kept_a + len(PROMPTS), 20, "a's receipts")
    wait_until(lambda: receipts(b, a.peer_id, "given") == kept_b + len(PROMPTS), 20, "b's receipts")


def test_kill_the_offload_target_on_a_direct_link(nodes):
    a, b = nodes
    long_tokens = 14
    a.force("local")
    want = a.chat(PROMPTS[1], long_tokens)["choices"][0]["message"]["content"]
    a.force("offload", (b.peer_id, "0:30"))
    before = counters(a)["received"]["direct"]
    parts: list[str] = []
    stamps: list[float] = []
    final = None
    for chunk in a.chat_stream(PROMPTS[1], long_tokens):
        choice = chunk["choices"][0]
        parts.append(choice["delta"].get("content") or "")
        if parts[-1]:
            stamps.append(time.perf_counter())
        if b.process is not None and b.process.poll() is None and sum(1 for p in parts if p) == 3:
            b.kill()
            stamps.append(time.perf_counter())
        if choice.get("finish_reason"):
            final = chunk
    assert b.process is not None and b.process.poll() is not None
    assert "".join(parts) == want
    print(f"\nkill -9 of the offload target on a direct link: longest gap after the kill "
          f"{longest_gap(stamps[3:]):.3f} s")
    assert final is not None
    route = final["shoal_route"]
    assert route["replans"] >= 1 and route["peers"][0] != b.peer_id, route
    assert counters(a)["received"]["direct"] > before  # the tokens before the kill came over the link
