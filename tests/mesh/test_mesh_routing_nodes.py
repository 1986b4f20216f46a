"""Routing across three real node processes (NumPy backend, loopback), driven by the official `openai`
client (max_retries=0): a refused or unreachable peer leads to a re-plan or to a coded 503 (never a 500), and
a request's own route (`extra_body={"shoal": ...}`, `x-shoal-route`) is followed and validated.

Node a is the origin; b and c serve others (the default). c refuses (serve_others off) where a test says so.
"""

from __future__ import annotations

import json
import os
import shutil

import openai
import pytest
from shoal.mesh.commands.cli import main
from shoal.mesh.p2p.identity import Identity

from tests.mesh.mesh_nodes import wait_until
from tests.mesh.split_nodes import MODEL, SplitNode, start_nodes

pytestmark = pytest.mark.timeout(300)

QUESTION = [{"role": "user", "content": "Name a primary colour."}]
FAKE_PEER = "p" + "z" * 51


@pytest.fixture(scope="module")
def mesh3(tmp_path_factory):
    base = tmp_path_factory.mktemp("route3")
    secret = os.urandom(32).hex()
    for n in "abc":
        Identity.load_or_create(base / n, name=n)
    a = SplitNode("a", base / "a")
    b = SplitNode("b", base / "b", {"mesh": {"bootstrap": [a.api]}})
    c = SplitNode("c", base / "c", {"mesh": {"bootstrap": [a.api]}})
    nodes = [a, b, c]
    start_nodes(nodes, secret)
    try:
        def ready() -> bool:
            peers = a.peers()
            return all(n.peer_id in peers and peers[n.peer_id]["advert"].get("split", {}).get("serve_others")
                       for n in (b, c))

        wait_until(ready, 60, "a linked to b and c, both serving others")
        yield a, b, c
    finally:
        for node in nodes:
            node.kill(15)


def client(node: SplitNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{node.api}/v1", api_key="none", max_retries=0, timeout=120)


def ask(node: SplitNode, **kw) -> dict:
    reply = client(node).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0,
                                                 **kw)
    return reply.model_extra["shoal_route"]


def test_a_refusing_peer_is_replanned_around_or_answered_with_a_code(mesh3):
    a, b, c = mesh3
    local = client(a).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0,
                                              logprobs=True, top_logprobs=2,
                                              extra_headers={"x-shoal-route": "local"})
    c.policy(serve_others=False)
    try:
        a.force("offload", (c.peer_id, "0:30"))  # a stale plan: c refuses it
        route = ask(a, extra_body={"shoal": {"avoid": [b.peer_id]}})
        assert route["kind"] == "local" and route["replans"] == 1, route  # re-planned without c (nor b)
        with pytest.raises(openai.APIStatusError) as refused:
            ask(a, extra_body={"shoal": {"route": "offload", "avoid": ["b"]}})
        assert refused.value.status_code == 503, refused.value
        assert refused.value.body["code"] == "peer_refused", refused.value.body
        assert refused.value.response.headers["x-should-retry"] == "false"
        with pytest.raises(openai.APIStatusError) as refused_stream:  # before the first byte: an HTTP 503
            client(a).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, stream=True,
                                              extra_body={"shoal": {"route": "offload", "avoid": ["b"]}})
        assert refused_stream.value.status_code == 503
        a.force("offload", (FAKE_PEER, "0:30"))  # a peer that is not linked
        with pytest.raises(openai.APIStatusError) as gone:
            ask(a, extra_body={"shoal": {"route": "offload", "avoid": ["b", "c"]}})
        assert (gone.value.status_code, gone.value.body["code"]) == (503, "peer_unreachable"), gone.value.body
        c.policy(serve_others=True, metered=True)  # a metered link refuses as well
        a.force("offload", (c.peer_id, "0:30"))
        with pytest.raises(openai.APIStatusError) as metered:
            ask(a, extra_body={"shoal": {"route": "offload", "avoid": ["b"]}})
        assert metered.value.body["code"] == "peer_refused" and "metered" in metered.value.body["message"]
    finally:
        a.force(None)
        c.policy(serve_others=True, metered=False)
    wait_until(lambda: a.peers()[c.peer_id]["advert"]["split"]["serve_others"], 20, "c serving again")
    # the request's own route and preferences, by peer id or name
    route = ask(a, extra_body={"shoal": {"route": "offload", "prefer": ["c"]}})
    assert route["kind"] == "offload" and route["peers"] == [c.peer_id], route
    route = ask(a, extra_headers={"x-shoal-route": "offload"}, extra_body={"shoal": {"avoid": ["c"]}})
    assert route["kind"] == "offload" and route["peers"] == [b.peer_id], route
    route = ask(a, extra_body={"shoal": {"route": "split", "prefer": [b.peer_id]}})
    assert route["kind"] == "split" and set(route["peers"]) == {"local", b.peer_id}, route
    offloaded = client(a).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0,
                                                  logprobs=True, top_logprobs=2,
                                                  extra_body={"shoal": {"route": "offload"}})
    assert offloaded.model_extra["shoal_route"]["kind"] == "offload"
    assert offloaded.choices[0].message.content == local.choices[0].message.content
    remote, here = offloaded.choices[0].logprobs.content, local.choices[0].logprobs.content
    assert [(t.token, t.bytes, [x.token for x in t.top_logprobs]) for t in remote] == \
        [(t.token, t.bytes, [x.token for x in t.top_logprobs]) for t in here]  # carried over the mesh
    assert [t.logprob for t in remote] == pytest.approx([t.logprob for t in here], abs=1e-4)
    for shoal, param in (({"route": "sideways"}, "shoal.route"), ({"prefer": "b"}, "shoal.prefer")):
        with pytest.raises(openai.BadRequestError) as bad:
            ask(a, extra_body={"shoal": shoal})
        assert bad.value.body["param"] == param, bad.value.body
    with pytest.raises(openai.BadRequestError) as bad:
        ask(a, extra_headers={"x-shoal-route": "sideways"})
    assert bad.value.body["param"] == "x-shoal-route"


def test_an_offload_leaves_one_countersigned_receipt_on_each_side(mesh3, tmp_path, capsys):
    a, b, _ = mesh3

    def receipts(node: SplitNode) -> list[str]:
        path = node.data_dir / "usage" / "receipts.jsonl"
        return path.read_text().splitlines() if path.exists() else []

    before_a, before_b = len(receipts(a)), len(receipts(b))
    route = ask(a, extra_body={"shoal": {"route": "offload", "prefer": [b.peer_id]}})
    assert route["kind"] == "offload" and route["peers"] == [b.peer_id], route
    wait_until(lambda: len(receipts(b)) == before_b + 1, 20, "b kept the countersigned receipt")
    assert len(receipts(a)) == before_a + 1
    assert receipts(a)[-1] == receipts(b)[-1]  # the same receipt, signed by both
    usage = a.call("GET", "/v1/mesh/usage")
    assert usage["peers"][b.peer_id]["received_requests"] >= 1, usage
    assert b.call("GET", "/v1/mesh/usage")["peers"][a.peer_id]["given_requests"] >= 1
    for node in (a, b):
        assert main(["usage", "verify", str(node.data_dir / "usage" / "receipts.jsonl")]) == 0
    tampered = tmp_path / "tampered.jsonl"
    shutil.copy(b.data_dir / "usage" / "receipts.jsonl", tampered)
    text = tampered.read_text()
    tampered.write_text(text.replace('"tokens_out":', '"tokens_out":1', 1))
    assert main(["usage", "verify", str(tampered)]) != 0
    capsys.readouterr()
    # a split: b's stage returns its receipt when the sequence closes
    route = ask(a, extra_body={"shoal": {"route": "split", "prefer": [b.peer_id]}})
    assert route["kind"] == "split" and b.peer_id in route["peers"], route
    wait_until(lambda: len(receipts(b)) == before_b + 2, 20, "b kept the stage's countersigned receipt")
    assert receipts(a)[-1] == receipts(b)[-1]
    stage = json.loads(receipts(a)[-1])["usage"]
    assert stage["kind"] == "stage" and stage["tokens_in"] > 10 and stage["tokens_out"] >= 1, stage
    assert main(["usage", "verify", str(a.data_dir / "usage" / "receipts.jsonl")]) == 0


def test_a_peer_over_its_quota_is_a_429(mesh3):
    a, b, c = mesh3
    only_c = {"shoal": {"route": "offload", "prefer": ["c"], "avoid": ["b"]}}
    assert ask(a, extra_body=only_c)["peers"] == [c.peer_id]  # c has served a some tokens this hour
    c.policy(max_tokens_per_peer_per_hour=1)
    try:
        with pytest.raises(openai.RateLimitError) as over:
            ask(a, extra_body=only_c)
        assert over.value.body["code"] == "peer_quota", over.value.body
        assert 0 < int(over.value.response.headers["retry-after"]) <= 3600
        assert over.value.response.headers["x-should-retry"] == "false"
        assert ask(a, extra_body={"shoal": {"route": "offload"}})["peers"] == [b.peer_id]  # re-planned to b
    finally:
        c.policy(max_tokens_per_peer_per_hour=0)
