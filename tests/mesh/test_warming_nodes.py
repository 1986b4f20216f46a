"""Members prepare what a peer's plans would likely ask of them (`split.warming`): two real node processes
over WebRTC on loopback (NumPy backend).

a loads the model and answers a request with it; b then joins. b holds the model's file but has not loaded
it, offers a 120 MiB models budget (too small for the whole model, so a request at a that leaves a splits
with b), and building any span on b takes `STAGE_DELAY_S` longer (an injected slow load, as a compile on a
cold cache would be). b must load its likely span by itself, before any request asks it for anything; the
first split at a onto b must then use exactly that span and show no wait for b's stage (`peer_load`
progress), while a span b did not warm does show one. c holds no copy of the model but may fetch spans to
warm (`warm_fetch_spans`): it fetches only its likely span's bytes by CID, and a split onto it waits for
nothing either.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

import pytest

from tests.mesh.mesh_nodes import wait_until
from tests.mesh.split_nodes import MODEL, SplitNode

pytestmark = pytest.mark.timeout(300)

STAGE_DELAY_S = 2.5
PROMPT = "Name a primary colour."
MAX_TOKENS = 4


def stream(node: SplitNode, shoal: dict[str, Any] | None = None) -> tuple[str, list[dict], dict]:
    """A streamed greedy chat at `node`: (text, progress reports, the final chunk's `shoal_route`)."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    if shoal:
        body["shoal"] = shoal
    request = urllib.request.Request(f"{node.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    text, progress, route = "", [], {}
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith(": shoal progress "):
                progress.append(json.loads(line[len(": shoal progress "):]))
            elif line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunk = json.loads(line[5:])
                assert "error" not in chunk, chunk
                for choice in chunk.get("choices", []):
                    text += choice.get("delta", {}).get("content") or ""
                route = chunk.get("shoal_route") or route
    return text, progress, route


def warming(node: SplitNode) -> dict[str, Any]:
    return node.call("GET", "/v1/mesh/route")["warming"]


def warmed_for(node: SplitNode, origin: str) -> list[str] | None:
    """The spans `node` guesses a plan at `origin` would give it, once every one of them is loaded."""
    view = warming(node)
    likely = [g for g in view["likely"] if g["origin"] == origin and g["model"] == MODEL]
    if not likely or likely[0]["kind"] != "split" or not likely[0]["spans"]:
        return None
    ready = {e["span"] for e in view["entries"] if e["model"] == MODEL and e["kind"] == "stage"
             and e["state"] == "ready"}
    spans = likely[0]["spans"]
    return spans if set(spans) <= ready else None


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("warming")
    secret = os.urandom(32).hex()
    a = SplitNode("a", base / "a", {"split": {"speed_probe": False}})
    b = SplitNode("b", base / "b", {"mesh": {"bootstrap": [a.api]},
                                    "models": {"preload": False, "memory_budget_mb": 120},
                                    "split": {"speed_probe": False}},
                  harness_args=["--stage-delay-s", str(STAGE_DELAY_S)])
    # c holds no copy of the model, but may fetch a span of it to warm (warm_fetch_spans)
    c = SplitNode("c", base / "c", {"mesh": {"bootstrap": [a.api]}, "models": {"memory_budget_mb": 120},
                                    "split": {"speed_probe": False, "warm_fetch_spans": True}},
                  harness_args=["--no-model"])
    nodes = [a, b, c]
    try:
        a.launch(secret).wait_ready()
        local_text, _, route = stream(a, {"route": "local"})  # a uses the model before b and c are there
        assert route["kind"] == "local", route
        b.launch(secret)
        c.launch(secret)
        b.wait_ready()
        c.wait_ready()
        wait_until(lambda: {b.peer_id, c.peer_id} <= set(a.peers()) and a.peer_id in b.peers()
                   and a.peer_id in c.peers(), 60, "a linked to b and c")
        yield a, b, c, local_text
    finally:
        for node in nodes:
            node.kill(15)


def test_a_member_warms_its_likely_span_and_the_first_split_onto_it_does_not_wait(pair):
    a, b, _, local_text = pair
    in_use = a.call("GET", "/v1/mesh/route")["advert"]["split"]["in_use"]
    assert MODEL in in_use, in_use
    wait_until(lambda: warmed_for(b, a.peer_id) is not None, 90, "b's likely span for a loaded")
    spans = warmed_for(b, a.peer_id)
    assert spans is not None and len(spans) == 1, warming(b)

    text, progress, route = stream(a, {"route": "split", "prefer": [b.peer_id]})
    assert route["kind"] == "split", route
    assert dict(zip(route["peers"], route["spans"], strict=True))[b.peer_id] == spans[0], (route, spans)
    assert [p for p in progress if p.get("waiting") == "peer_load"] == [], progress
    assert text == local_text

    # the control: a span b did not warm takes the injected load, which the stream reports
    cold = "20:30" if spans[0] != "20:30" else "0:10"
    stages = [("local", "0:20"), (b.peer_id, "20:30")] if cold == "20:30" else \
        [(b.peer_id, "0:10"), ("local", "10:30")]
    a.force("split", *stages)
    try:
        text, progress, route = stream(a)
    finally:
        a.force(None)
    assert route["kind"] == "split" and cold in route["spans"], route
    assert any(p.get("waiting") == "peer_load" and p.get("layers") == cold for p in progress), progress
    assert text == local_text


def test_warming_waits_while_the_member_serves_no_peers(pair):
    _, b, _, _ = pair
    b.policy(serve_others=False)
    try:
        wait_until(lambda: "serve_others" in warming(b)["paused"], 20, "b's warming paused by its policy")
    finally:
        b.policy(serve_others=True)
    wait_until(lambda: warming(b)["paused"] == "", 20, "b's warming resumed")


def test_a_member_without_the_file_fetches_only_its_likely_span_when_allowed(pair):
    a, _, c, local_text = pair
    wait_until(lambda: warmed_for(c, a.peer_id) is not None, 120, "c's likely span for a fetched and loaded")
    spans = warmed_for(c, a.peer_id)
    assert spans is not None and len(spans) == 1, warming(c)
    start, stop = spans[0].split(":")
    sparse = list(c.data_dir.rglob(f"*layers-{start}-{stop}*.gguf"))
    assert len(sparse) == 1, list(c.data_dir.rglob("*.gguf"))  # only that span's bytes, fetched by CID
    assert sparse[0].stat().st_blocks * 512 < 0.85 * sparse[0].stat().st_size

    text, progress, route = stream(a, {"route": "split", "prefer": [c.peer_id]})
    assert route["kind"] == "split" and c.peer_id in route["peers"], route
    assert dict(zip(route["peers"], route["spans"], strict=True))[c.peer_id] == spans[0], (route, spans)
    assert [p for p in progress if p.get("waiting") == "peer_load"] == [], progress
    assert text == local_text


@pytest.fixture(scope="module")
def offload_pair(tmp_path_factory):
    """p has the model loaded but has measured nothing yet; e holds the file, has not loaded it, has room for
    it, and loads models (and spans) `STAGE_DELAY_S` slower: a plan at p that leaves p would offload to e."""
    base = tmp_path_factory.mktemp("warming-offload")
    secret = os.urandom(32).hex()
    p = SplitNode("p", base / "p", {"split": {"speed_probe": False}})
    # e's datagrams are held 3 ms (an RTT of a LAN, not loopback's fraction of a millisecond), at which an
    # offload is clearly cheaper than a split for two equal devices; at ~0.1 ms RTT the split's per-token
    # link cost is below the offload's token-stream cost, so the guess would be a span
    e = SplitNode("e", base / "e", {"mesh": {"bootstrap": [p.api]}, "models": {"preload": False},
                                    "split": {"speed_probe": False}},
                  harness_args=["--stage-delay-s", str(STAGE_DELAY_S), "--delay-ms", "3"])
    try:
        p.launch(secret).wait_ready()
        e.launch(secret).wait_ready()
        wait_until(lambda: e.peer_id in p.peers() and p.peer_id in e.peers(), 60, "p and e linked")
        yield p, e
    finally:
        for node in (p, e):
            node.kill(15)


def test_a_member_loads_the_whole_model_for_a_likely_offload(offload_pair):
    p, e = offload_pair

    def warm_whole() -> bool:
        view = warming(e)
        likely = [g for g in view["likely"] if g["origin"] == p.peer_id and g["model"] == MODEL]
        return bool(likely) and likely[0]["kind"] == "offload" and any(
            x["model"] == MODEL and x["kind"] == "model" and x["state"] == "ready" for x in view["entries"])

    wait_until(warm_whole, 90, "e's whole model loaded for p's likely offload")
    models = {m["id"]: m["shoal"] for m in e.call("GET", "/v1/models")["data"]}
    assert models[MODEL]["state"] == "loaded", models[MODEL]

    text, progress, route = stream(p, {"route": "offload", "prefer": [e.peer_id]})
    assert route["kind"] == "offload" and route["peers"] == [e.peer_id], route
    assert not [r for r in progress if "take the request" in r.get("message", "")], progress
    local_text, _, _ = stream(p, {"route": "local"})
    assert text == local_text
