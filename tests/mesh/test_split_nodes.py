"""Offload and split across three real node processes over WebRTC on loopback (NumPy backend).

Node a is the origin (its API gets every request); b and c serve others. a's allow-list holds b only, so c
is a mesh member a does not trust. b keeps tensors on the data channel (no direct tensor links), so c's stages
get a direct link and b's the channel: both transports in one split. Greedy output must be the same whichever
way a request is served, and the stream must survive `kill -9` of a stage (c, on a direct link). The kill
test runs last (it removes c).
"""

from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.split import wire

from tests.mesh.mesh_nodes import wait_until
from tests.mesh.split_nodes import MODEL, SplitNode, start_nodes
from tests.mesh.tensor_frames import raw_input

pytestmark = pytest.mark.timeout(400)

PROMPTS = ["What is the capital of France?", "Name a primary colour.", "Say hello.", "2+2=",
           "What do bees make?"]
MAX_TOKENS = 4


def longest_gap(stamps: list[float]) -> float:
    """The longest time between two consecutive stamps (reported, never asserted: wall-clock)."""
    return max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)


@pytest.fixture(scope="module")
def mesh3(tmp_path_factory):
    base = tmp_path_factory.mktemp("split3")
    secret = os.urandom(32).hex()
    ids = {n: Identity.load_or_create(base / n, name=n).peer_id for n in "abc"}
    a = SplitNode("a", base / "a", {"mesh": {"allow": [ids["b"]]}})
    b = SplitNode("b", base / "b", {"mesh": {"bootstrap": [a.api]}, "split": {"direct_tensors": False}})
    c = SplitNode("c", base / "c", {"mesh": {"bootstrap": [a.api]}})
    d = SplitNode("d", base / "d", {"mesh": {"bootstrap": [a.api]}}, harness_args=["--no-model"])  # no model
    nodes = [a, b, c, d]
    start_nodes(nodes, secret)
    try:
        def ready(node: SplitNode, others: tuple[SplitNode, ...]) -> bool:
            peers = node.peers()
            return all(
                n.peer_id in peers and peers[n.peer_id]["advert"].get("split", {}).get("serve_others")
                for n in others
            )

        wait_until(lambda: ready(a, (b, c)), 60, "a linked to b and c, with their adverts")
        wait_until(lambda: ready(d, (a,)), 60, "d linked to a, with its advert")
        yield a, b, c, d
    finally:
        for node in nodes:
            node.kill(15)


@pytest.fixture(scope="module")
def expected(mesh3) -> dict[str, str]:
    a, *_ = mesh3
    a.force("local")
    out = {}
    for prompt in PROMPTS:
        reply = a.chat(prompt, MAX_TOKENS)
        assert reply["shoal_route"]["kind"] == "local", reply
        out[prompt] = reply["choices"][0]["message"]["content"]
    return out


def _run_all(a: SplitNode) -> list[dict]:
    return [a.chat(prompt, MAX_TOKENS) for prompt in PROMPTS]


def test_two_and_three_stage_splits_and_offload_equal_local(mesh3, expected):
    a, b, c, _ = mesh3
    cases = {
        "split2": ("split", ("local", "0:15"), (b.peer_id, "15:30")),
        "split3": ("split", ("local", "0:10"), (b.peer_id, "10:20"), (c.peer_id, "20:30")),
        "offload": ("offload", (b.peer_id, "0:30")),
    }
    for label, (kind, *stages) in cases.items():
        a.force(kind, *stages)
        before = a.call("GET", "/v1/mesh/route")["offload_tokens"]["received"]
        for prompt, reply in zip(PROMPTS, _run_all(a), strict=True):
            assert reply["choices"][0]["message"]["content"] == expected[prompt], (label, prompt, reply)
            assert reply["usage"]["completion_tokens"] == MAX_TOKENS
            route = reply["shoal_route"]
            assert route["kind"] == kind and route["replans"] == 0, route
            assert route["peers"] == [p for p, _ in stages]
            assert route["spans"] == [s for _, s in stages]
            if kind == "split":  # b offers no direct link; c (and only c) does
                links = [t["link"] for t in route["stage_timing"]]
                assert links == ["local"] + ["direct" if p == c.peer_id else "channel" for p, _ in stages[1:]]
        if kind == "offload":  # b offers no direct link: its tokens came over the data channel
            after = a.call("GET", "/v1/mesh/route")["offload_tokens"]["received"]
            assert after["channel"] - before["channel"] == len(PROMPTS) * MAX_TOKENS, (before, after)
            assert after["direct"] == before["direct"], (before, after)
    requests = a.call("GET", "/v1/mesh/requests")["requests"]
    kinds = {r["route"]["kind"] for r in requests}
    assert {"local", "split", "offload"} <= kinds


def test_stages_serve_concurrent_requests(mesh3, expected):
    a, b, _, _ = mesh3
    a.force("split", ("local", "0:15"), (b.peer_id, "15:30"))
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda p: a.chat(p, MAX_TOKENS), PROMPTS[:3]))
    for prompt, reply in zip(PROMPTS[:3], replies, strict=True):
        assert reply["choices"][0]["message"]["content"] == expected[prompt], reply
        assert reply["shoal_route"]["kind"] == "split"


def test_node_without_the_model_offloads(mesh3, expected):
    a, _, _, d = mesh3
    a.force(None)
    for prompt in PROMPTS[:2]:
        reply = d.chat(prompt, MAX_TOKENS)
        route = reply["shoal_route"]
        assert route["kind"] == "offload" and route["peers"][0] != "local", reply
        assert reply["choices"][0]["message"]["content"] == expected[prompt]
        assert reply["usage"]["prompt_tokens"] > 10 and reply["usage"]["completion_tokens"] == MAX_TOKENS
    missing = d.call("POST", "/v1/chat/completions", {"model": "no-such-model", "messages": [
        {"role": "user", "content": "hi"}]})
    assert "error" in missing


def test_memory_capped_node_splits_over_trusted_peers_only(mesh3, expected):
    a, b, c, _ = mesh3
    a.force(None)
    total = psutil.virtual_memory().total
    # a and b can each hold about half the model; c (untrusted by a) could hold it all but must not be used
    a.policy(max_memory_share=80e6 / total, trusted_only_splits=True, prefer_local=True)
    b.policy(max_memory_share=90e6 / total)
    try:
        wait_until(lambda: a.peers()[b.peer_id]["advert"]["split"]["memory_budget"] < 200e6, 20, "b's advert")
        assert MODEL in a.peers()[b.peer_id]["advert"]["split"]["in_use"]
        for prompt in PROMPTS[:2]:
            # a's engine has the model loaded: under its cap it still runs it (only the KV cache is new)
            reply = a.chat(prompt, MAX_TOKENS)
            assert reply["shoal_route"]["kind"] == "local", reply["shoal_route"]
            assert reply["choices"][0]["message"]["content"] == expected[prompt]
            # an offload goes to b, whose engine has the model loaded (within its cap), never to c
            reply = a.chat(prompt, MAX_TOKENS, route="offload")
            assert reply.get("shoal_route", {}).get("peers") == [b.peer_id], reply
            assert reply["choices"][0]["message"]["content"] == expected[prompt]
        # (after the offloads: a stage b hosts for a split counts against its budget until its advert says
        # it is idle again)
        for prompt in PROMPTS[:2]:
            # a split fits only a's and b's caps (b has it loaded, but a split's stage counts its layers)
            reply = a.chat(prompt, MAX_TOKENS, route="split")
            route = reply["shoal_route"]
            assert route["kind"] == "split", route
            assert set(route["peers"]) == {"local", b.peer_id}, route
            assert c.peer_id not in route["peers"]
            assert reply["choices"][0]["message"]["content"] == expected[prompt]
    finally:
        a.policy(max_memory_share=0.5, trusted_only_splits=False, prefer_local=False)
        b.policy(max_memory_share=0.5)


def test_serve_others_off_refuses(mesh3):
    a, _, c, _ = mesh3
    c.policy(serve_others=False)
    try:
        opened = a.call("POST", "/test/control", {"peer": c.peer_id, "type": "stage.open",
                                                  "body": {"model": "smollm2-135m-instruct", "span": "0:10",
                                                           "seq": 1}})
        assert opened["error"]["code"] == "refused", opened
        offload = a.call("POST", "/test/control", {"peer": c.peer_id, "type": "offload.open",
                                                   "body": {"rid": 5, "model": "smollm2-135m-instruct",
                                                            "prompt_ids": [1, 2], "params": {}}})
        assert offload["error"]["code"] == "refused", offload
        wait_until(lambda: a.peers()[c.peer_id]["advert"]["split"]["serve_others"] is False, 20, "c's advert")
    finally:
        c.policy(serve_others=True)


def test_malformed_tensor_frames_are_refused_and_the_stage_lives(mesh3, expected):
    a, b, _, _ = mesh3
    opened = a.call("POST", "/test/control", {"peer": b.peer_id, "type": "stage.open",
                                              "body": {"model": "smollm2-135m-instruct", "span": "10:30",
                                                       "seq": 4242}})
    assert opened["reply"]["hidden"] == 576, opened
    bad = [
        raw_input(cols=575, data=bytes(4 * 576)),
        raw_input(dtype=9),
        raw_input()[:-8],
        raw_input(seqs=(999,)),
        raw_input(dtype=wire.I32),
        raw_input(op=77),
        raw_input()[:10],
        raw_input(count=3),
    ]
    for payload in bad:
        reply = a.call("POST", "/test/tensor", {"peer": b.peer_id, "payload": payload.hex()})
        assert reply["reply"]["op"] == "error", (payload[:40], reply)
    ok = a.call("POST", "/test/tensor", {"peer": b.peer_id, "payload": raw_input().hex()})
    assert ok["reply"]["op"] == "logits" and ok["reply"]["top_k"] == 8, ok
    a.call("POST", "/test/control", {"peer": b.peer_id, "type": "stage.close", "body": {"seq": 4242}})
    assert b.process is not None and b.process.poll() is None
    a.force("split", ("local", "0:15"), (b.peer_id, "15:30"))
    reply = a.chat(PROMPTS[0], MAX_TOKENS)
    assert reply["choices"][0]["message"]["content"] == expected[PROMPTS[0]]


def test_peer_without_the_model_fetches_only_its_span(mesh3, expected):
    a, _, _, d = mesh3
    a.force("split", ("local", "0:15"), (d.peer_id, "15:30"))
    reply = a.chat(PROMPTS[0], MAX_TOKENS)
    assert reply["choices"][0]["message"]["content"] == expected[PROMPTS[0]], reply
    assert reply["shoal_route"]["peers"] == ["local", d.peer_id]
    sparse = list(d.data_dir.rglob("*layers-15-30*.gguf"))
    assert len(sparse) == 1, list(d.data_dir.rglob("*.gguf"))
    stat = sparse[0].stat()
    assert stat.st_blocks * 512 < 0.85 * stat.st_size  # holes where layers 0-14 would be


def test_kill_a_stage_mid_generation(mesh3):
    a, b, c, _ = mesh3
    long_tokens = 14
    a.force("local")
    want = a.chat(PROMPTS[0], long_tokens)["choices"][0]["message"]["content"]
    a.force("split", ("local", "0:10"), (b.peer_id, "10:20"), (c.peer_id, "20:30"))
    parts: list[str] = []
    stamps: list[float] = []
    final = None
    for chunk in a.chat_stream(PROMPTS[0], long_tokens):
        assert "choices" in chunk, chunk
        choice = chunk["choices"][0]
        parts.append(choice["delta"].get("content") or "")
        if parts[-1]:
            stamps.append(time.perf_counter())
        if sum(1 for p in parts if p) == 3 and c.process is not None and c.process.poll() is None:
            c.process.kill()  # SIGKILL: no goodbye; the test's clock runs on (reaped below)
        if choice.get("finish_reason"):
            final = chunk
    c.kill()
    assert c.process is not None and c.process.poll() is not None, "c was not killed mid-stream"
    assert "".join(parts) == want
    print(f"\nkill -9 of a split stage: longest gap between tokens {longest_gap(stamps):.3f} s "
          f"(replan log {final and final['shoal_route'].get('replan_log')})")
    assert final is not None
    route = final["shoal_route"]
    assert route["replans"] >= 1, route
    assert c.peer_id not in route["peers"], route
    assert route["replan_log"][0]["lost"] == c.peer_id


def test_kill_the_offload_target_mid_generation(mesh3):
    a, b, _, d = mesh3
    long_tokens = 14
    alive = {n.peer_id: n for n in (a, b) if n.process is not None and n.process.poll() is None}
    a.force("local")
    want = a.chat(PROMPTS[1], long_tokens)["choices"][0]["message"]["content"]
    a.force(None)
    parts: list[str] = []
    final = None
    victim: SplitNode | None = None
    stamps: list[float] = []
    # an offload asked for (d holds a span of the model from an earlier test, so the planner might split)
    for chunk in d.chat_stream(PROMPTS[1], long_tokens, route="offload"):
        assert "choices" in chunk, chunk
        choice = chunk["choices"][0]
        parts.append(choice["delta"].get("content") or "")
        if parts[-1]:
            stamps.append(time.perf_counter())
        if victim is None and sum(1 for p in parts if p) == 3:
            running = [r for r in d.call("GET", "/v1/mesh/requests")["requests"] if r["status"] == "running"]
            victim = alive[running[-1]["route"]["peers"][0]]
            victim.kill()
            stamps.append(time.perf_counter())  # the gap counts from the kill (the lookup above took a while)
        if choice.get("finish_reason"):
            final = chunk
    assert victim is not None and victim.process is not None and victim.process.poll() is not None
    assert "".join(parts) == want
    print(f"\nkill -9 of the offload target: longest gap after the kill {longest_gap(stamps[3:]):.3f} s")
    assert final is not None
    route = final["shoal_route"]
    assert route["kind"] == "offload" and route["replans"] >= 1, route
    assert route["peers"][0] != victim.peer_id


@pytest.mark.slow
def test_compiled_backend_split_and_offload_equal_local(tmp_path):
    """The same over TVM-compiled shards (compiles 3-4 shards on a cold cache: opt in with -m slow)."""
    secret = os.urandom(32).hex()
    a = SplitNode("a", tmp_path / "a", {"models": {"backend": "tvm"}})
    b = SplitNode("b", tmp_path / "b", {"models": {"backend": "tvm"}, "mesh": {"bootstrap": [a.api]}})
    start_nodes([a, b], secret)
    try:
        wait_until(lambda: b.peer_id in a.peers(), 60, "a linked to b")
        for prompt in PROMPTS[:2]:
            texts = set()
            for route in (("local",), ("split", ("local", "0:15"), (b.peer_id, "15:30")),
                          ("offload", (b.peer_id, "0:30"))):
                a.force(*route)
                reply = a.chat(prompt, 8)
                assert reply["shoal_route"]["kind"] == route[0], reply
                texts.add(reply["choices"][0]["message"]["content"])
            assert len(texts) == 1, texts
    finally:
        for node in (a, b):
            node.kill(15)
