"""A browser tab serves offloaded requests (mesh/api/static/join/serve.js): Debian's Chromium, headless, in a
network namespace this test makes, joins a real `shoal node`, fetches the default model from it by CID with
every block verified in the page, loads it into wllama (llama.cpp in wasm, vendored by
scripts/install_wllama.sh) and advertises its measured speed; requests at the node offloaded to the tab
(forced with `PUT /v1/mesh/route`, or planned with `shoal.prefer`) stream llama.cpp's greedy tokens for the
same GGUF and prompt ids (tests/fixtures/llamacpp_browser.json, made by scripts/make_browser_fixture.py with
native llama.cpp); offload frames are checked like a native peer's, and what the tab cannot apply goes
elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from shoal.mesh.p2p.invite import Invite
from shoal.mesh.split.offload import MAX_PROMPT_IDS

from tests.mesh import chromium
from tests.mesh.browser_harness import TAB_ADDRESS, NamespacedNode, browser_namespace, wait, why_not
from tests.nodes import REPO

pytestmark = pytest.mark.timeout(420)
FIXTURE = json.loads((REPO / "tests" / "fixtures" / "llamacpp_browser.json").read_text())
CASES = {case["name"]: case for case in FIXTURE["cases"]}
VENDOR = REPO / "mesh" / "api" / "static" / "join" / "vendor" / "wllama"
MODEL = "smollm2-135m-instruct"
SAFE_MARGIN = 0.5
"""Least top-1 logit margin the reference prompts keep at every step: a wasm build of llama.cpp may add floats
in another order than the native one (differences of ~1e-3 on these logits), which could flip a near-tie."""
COMPUTE = "shoalMember.compute"
ARTIFACTS = Path(os.environ.get("SHOAL_TEST_ARTIFACTS", REPO / ".cache" / "artifacts"))


@pytest.fixture(scope="module")
def namespace():
    reason = why_not()
    if reason:
        pytest.skip(f"browser compute tests need chromium and network namespaces: {reason}")
    if not (VENDOR / "wllama.wasm").is_file():
        pytest.skip("wllama is not vendored (scripts/install.sh runs scripts/install_wllama.sh; needs npm)")
    with browser_namespace("shoalcpu") as name:
        yield name


@pytest.fixture(scope="module")
def node(namespace, tmp_path_factory):
    base = tmp_path_factory.mktemp("browsercompute")
    a = NamespacedNode("a", base / "a", {"models": {"backend": "numpy"}},
                       prefix=["ip", "netns", "exec", namespace])
    a.args = ["--join", Invite.create("compute", (a.api,)).to_token()]
    try:
        a.launch().wait_ready(180, ready=lambda health: health.get("status") == "ok")
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="module")
def tab(node, namespace, tmp_path_factory):
    """A page that joined `node` and serves: its model loaded and its speed measured."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    browser = chromium.Chromium.launch(profile, prefix=["ip", "netns", "exec", namespace],
                                       log=profile.parent / "chromium.log")
    try:
        token = node.args[1]
        page = browser.open(f"{node.url}/join#{token}")
        page.wait_for("window.shoalMember && shoalMember.status.state === 'linked'", 30, "the page to join")
        page.wait_for(f"{COMPUTE}.state === 'ready' || {COMPUTE}.state === 'error'", 240, "the model to load")
        assert page.evaluate(f"{COMPUTE}.state") == "ready", page.evaluate(f"{COMPUTE}.detail")
        yield page
    finally:
        browser.close()


def tab_id(tab: chromium.Tab) -> str:
    return tab.evaluate("shoalMember.identity.id")


def served(tab: chromium.Tab) -> list[dict[str, Any]]:
    return tab.evaluate(f"{COMPUTE}.served")


def text_of(chunks: list[dict[str, Any]], chat: bool) -> str:
    key = "delta" if chat else None
    parts = []
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            parts.append((choice.get(key) or {}).get("content") or "" if chat else choice.get("text") or "")
    return "".join(parts)


def finish_of(chunks: list[dict[str, Any]]) -> str | None:
    reasons = [c["finish_reason"] for chunk in chunks for c in chunk.get("choices", [])
               if c.get("finish_reason")]
    return reasons[-1] if reasons else None


def route_of(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    routes = [chunk["shoal_route"] for chunk in chunks if "shoal_route" in chunk]
    assert routes, "no shoal_route in the stream"
    return routes[-1]


def test_reference_prompts_have_safe_margins():
    """The fixture's own guard: every step of both references has a clear top-1 (see SAFE_MARGIN)."""
    assert FIXTURE["n_threads"] == 1 and all(c["llama_cpp_tokenizes_the_same"] for c in CASES.values())
    assert all(case["min_margin"] >= SAFE_MARGIN for case in CASES.values()), {
        n: c["min_margin"] for n, c in CASES.items()}
    assert CASES["capital"]["finish_reason"] == "stop" and len(CASES["count"]["tokens"]) >= 16


def test_the_tab_fetches_the_model_by_cid_verifies_it_and_advertises_its_speed(node, tab):
    entry = next(m for m in node.get("/v1/ipfs/models")["models"] if MODEL in m["names"])
    assert tab.evaluate(f"{COMPUTE}.cid") == entry["cid"]
    assert tab.evaluate(f"{COMPUTE}.progress") == [entry["size"], entry["size"]]
    # block by block from the node's trustless gateway (raw blocks, verified in the page): the root, the
    # inner nodes of the balanced DAG (174 links each) and the 256 KiB leaves
    sent = [u for u in tab.sent() if u.startswith(f"{node.url}/ipfs/")]
    blocks = sorted(set(sent))
    assert len(blocks) == len(sent)  # each once: one fetch of the model
    leaves = -(-entry["size"] // (256 * 1024))
    assert all(u.endswith("?format=raw") for u in blocks)
    assert any(u.endswith(f"/ipfs/{entry['cid']}?format=raw") for u in blocks)
    assert len(blocks) == 1 + -(-leaves // 174) + leaves
    me = tab_id(tab)

    def advert() -> dict[str, Any] | None:
        seen = node.members().get(me, {}).get("advert", {})
        return seen if MODEL in seen.get("models", []) else None

    seen = wait(advert, 30, "the tab's advert with the model")
    speed = seen["speed"][MODEL]
    assert speed["decode_tok_s"] > 0 and speed["prefill_tok_s"] > 0 and speed["batch_cost"] == 1
    assert seen["split"]["serve_others"] is True and seen["split"]["memory_budget"] > 0
    assert seen["kind"] == "browser" and seen["queue_depth"] == 0
    if tab.evaluate("typeof navigator.getBattery === 'function'"):
        assert isinstance(seen["battery"], int | float) and isinstance(seen["plugged"], bool)
    shown = tab.evaluate("document.querySelector('#compute-status').dataset.state")
    assert shown == "ready" and tab.evaluate("document.querySelector('#serve').checked")


def test_a_forced_offload_to_the_tab_streams_llamacpps_greedy_tokens(node, tab):
    case = CASES["count"]
    me = tab_id(tab)
    before = len(served(tab))
    assert "error" not in node.call("PUT", "/v1/mesh/route", {"kind": "offload",
                                                             "stages": [{"peer": me, "layers": "0:30"}]})
    try:
        chunks = node.stream("/v1/completions", {
            "model": MODEL, "prompt": case["prompt_ids"], "max_tokens": len(case["tokens"]), "temperature": 0,
            "stream": True})
    finally:
        node.call("PUT", "/v1/mesh/route", {})
    route = route_of(chunks)
    assert route["kind"] == "offload" and route["peers"] == [me], route
    record = served(tab)[before]
    assert record["prompt_ids"] == case["prompt_ids"] and record["finish"] == "length", record
    assert record["tokens"] == case["tokens"], record  # the tab's token ids are native llama.cpp's
    assert text_of(chunks, chat=False) == case["text"] and finish_of(chunks) == "length"


def test_the_planner_offloads_to_the_tab_it_is_asked_to_prefer(node, tab):
    """No forced route: the node plans an offload from the tab's advert (model, speed, serve_others)."""
    case = CASES["capital"]
    me = tab_id(tab)
    before = len(served(tab))
    chunks = node.stream("/v1/chat/completions", {
        "model": MODEL, "messages": case["messages"], "max_tokens": 16, "temperature": 0, "stream": True,
        "shoal": {"route": "offload", "prefer": [me]}})
    route = route_of(chunks)
    assert route["kind"] == "offload" and route["peers"] == [me], route
    record = served(tab)[before]
    assert record["prompt_ids"] == case["prompt_ids"]  # the node's prompt ids, run as they are
    assert record["tokens"] == case["tokens"] and record["finish"] == "stop"
    assert text_of(chunks, chat=True) == case["text"] and finish_of(chunks) == "stop"
    wait(lambda: node.members()[me]["advert"]["queue_depth"] == 0, 20, "the tab to advertise it is idle")
    done = len([r for r in served(tab) if r["finish"] in ("stop", "length")])
    tab.wait_for(f"document.querySelector('#compute-served').textContent.startsWith('{done} request')", 10,
                 "the page to count what it served")
    print(f"screenshot of a serving tab: {tab.screenshot(ARTIFACTS / 'join-page-serving.png')}")


@pytest.mark.parametrize(("body", "code"), [
    ({"rid": -1}, "bad_request"),
    ({"rid": 2**32}, "bad_request"),
    ({"model": ""}, "bad_request"),
    ({"prompt_ids": []}, "bad_request"),
    ({"prompt_ids": [1.5]}, "bad_request"),
    ({"prompt_ids": ["1"]}, "bad_request"),
    ({"prompt_ids": [1] * (MAX_PROMPT_IDS + 1)}, "bad_request"),
    ({"prompt_ids": [1, 10**9]}, "bad_request"),
    ({"params": []}, "bad_request"),
    ({"params": {"bogus": 1}}, "refused"),  # a field of a newer origin: another member may know it
    ({"params": {"temperature": 5}}, "bad_request"),
    ({"params": {"top_p": 0}}, "bad_request"),
    ({"params": {"max_tokens": 0}}, "bad_request"),
    ({"model": "another-model"}, "no_model"),
    ({"params": {"stop": ["."]}}, "refused"),
    ({"params": {"logprobs": 2}}, "refused"),
    ({"params": {"constraint": {"kind": "json", "spec": "{}"}}}, "refused"),
    ({"params": {"repetition_penalty": 1.2}}, "refused"),
    ({"params": {"seed": 7, "temperature": 0.8}}, "refused"),
    ({"params": {"max_tokens": 5000}}, "refused"),
])
def test_offload_frames_are_checked_like_a_native_peers(tab, body, code):
    full = {"rid": 7, "model": MODEL, "prompt_ids": [1, 2, 3], "params": {"temperature": 0, "max_tokens": 4}}
    full.update(body)
    if isinstance(body.get("params"), dict):
        full["params"] = {"temperature": 0, **body["params"]}
    before = len(served(tab))
    got = tab.evaluate(f"""(() => {{
        try {{ return ['accepted', {COMPUTE}.open({{}}, {json.dumps(full)})]; }}
        catch (error) {{ return [error.code, error.message]; }}
    }})()""")
    assert got[0] == code, got
    assert len(served(tab)) == before and tab.evaluate(f"{COMPUTE}.job === null")


def test_a_busy_or_switched_off_tab_refuses(tab):
    body = json.dumps({"rid": 9, "model": MODEL, "prompt_ids": [1, 2], "params": {"temperature": 0}})
    attempt = (f"(() => {{ try {{ {COMPUTE}.open({{}}, {body}); return 'accepted'; }} "
               "catch (e) { return e.code; } })()")
    tab.evaluate(f"{COMPUTE}.job = {{link: null, rid: 1}}")
    try:
        assert tab.evaluate(attempt) == "busy"
    finally:
        tab.evaluate(f"{COMPUTE}.job = null")
    tab.evaluate(f"{COMPUTE}.setServe(false)")
    try:
        assert tab.evaluate(attempt) == "refused"
        assert tab.evaluate(f"{COMPUTE}.advertFields().split.serve_others") is False
    finally:
        tab.evaluate(f"{COMPUTE}.setServe(true)")


def test_what_the_tab_cannot_apply_is_planned_elsewhere(node, tab):
    """Stop strings: the tab refuses (code `refused`), so the node plans again without it and answers."""
    me = tab_id(tab)
    before = len(served(tab))
    chunks = node.stream("/v1/chat/completions", {
        "model": MODEL, "messages": CASES["capital"]["messages"], "max_tokens": 8, "temperature": 0,
        "stop": ["Paris"], "stream": True, "shoal": {"prefer": [me]}})
    route = route_of(chunks)
    assert me not in route["peers"] and route["replans"] == 1, route
    assert finish_of(chunks) in ("stop", "length") and len(served(tab)) == before


def test_switching_serving_off_withdraws_the_offer(node, tab):
    me = tab_id(tab)
    tab.evaluate("document.querySelector('#serve').click()")
    try:
        wait(lambda: node.members()[me]["advert"]["split"]["serve_others"] is False, 20, "a withdrawn offer")
        assert tab.evaluate("localStorage.getItem('shoal.serve')") == "off"
        assert tab.evaluate("document.querySelector('#compute-status').dataset.state") == "off"
    finally:
        tab.evaluate("document.querySelector('#serve').click()")
    wait(lambda: node.members()[me]["advert"]["split"]["serve_others"] is True, 20, "the offer again")


def test_without_wllama_the_page_says_it_does_not_compute(node, tab):
    """As on a node where scripts/install_wllama.sh did not run (no npm): the module is not there, the tab
    stays a member that chats, and says it does not compute."""
    status = node._curl("GET", "/join/vendor/wllama/other.js", None, 10, "-o", "/dev/null",
                        "-w", "%{http_code}")
    assert status == b"404"
    state = tab.evaluate("""(async () => {
        const { Compute } = await import('/join/serve.js');
        const compute = new Compute({ wllama: '/join/vendor/absent/index.js' });
        await compute.start({});
        return [compute.state, compute.detail, compute.advertFields().models];
    })()""")
    assert state[0] == "unavailable" and "does not compute" in state[1] and state[2] == []


def test_sampled_requests_use_llamacpps_sampler(node, tab):
    """Temperature, top_p, top_k and min_p go to wllama's sampler (no reference: another engine's RNG)."""
    me = tab_id(tab)
    before = len(served(tab))
    chunks = node.stream("/v1/chat/completions", {
        "model": MODEL, "messages": CASES["capital"]["messages"], "max_tokens": 4, "temperature": 0.8,
        "top_p": 0.9, "top_k": 40, "stream": True, "shoal": {"route": "offload", "prefer": [me]}})
    assert route_of(chunks)["peers"] == [me]
    record = served(tab)[before]
    assert record["finish"] in ("stop", "length") and 1 <= len(record["tokens"]) <= 4


def test_a_client_that_goes_away_cancels_the_tabs_work(node, tab):
    """The origin sends `offload.cancel` when its client disconnects; the tab stops between tokens."""
    me = tab_id(tab)
    before = len(served(tab))
    story = [{"role": "user", "content": "Write a very long story about the sea."}]
    body = {"model": MODEL, "messages": story, "max_tokens": 400, "temperature": 0, "stream": True,
            "shoal": {"route": "offload", "prefer": [me]}}
    client = node.open_stream("/v1/chat/completions", body)
    try:  # the client goes away once the tab is generating (not after a fixed time: it may finish first)
        tab.wait_for(f"{COMPUTE}.served.length > {before} && {COMPUTE}.served[{before}].tokens.length >= 2",
                     120, "the tab to generate")
    finally:
        client.kill()
        client.wait(10)
    tab.wait_for(f"{COMPUTE}.served.length > {before} && {COMPUTE}.served[{before}].finish !== null", 60,
                 "the tab to stop")
    record = served(tab)[before]
    assert record["finish"] == "cancelled" and len(record["tokens"]) < 400, record
    tab.wait_for(f"{COMPUTE}.job === null", 10, "the tab to be free again")


def test_a_reloaded_tab_loads_the_model_it_kept_without_fetching_it(node, tab):
    """The verified file is kept in IndexedDB by CID: a reload (a phone reopening the page) fetches none."""
    me = tab_id(tab)

    def block_requests() -> int:
        return len([u for u in tab.sent() if u.startswith(f"{node.url}/ipfs/")])

    before = block_requests()
    tab.call("Page.reload")
    tab.wait_for(f"window.shoalMember && {COMPUTE}.state === 'ready'", 240, "the reloaded tab's model")
    assert tab.evaluate(f"{COMPUTE}.fromCache") is True and block_requests() == before
    assert tab_id(tab) == me  # the same member (its identity is kept too)
    wait(lambda: MODEL in node.members().get(me, {}).get("advert", {}).get("models", []), 30,
         "the reloaded tab to offer the model again")


@pytest.fixture(scope="module")
def lan_node(namespace, tmp_path_factory):
    """A node on the namespace's other address with an API key: its page is no secure context (as a phone's
    `http://LAN-ADDRESS/join`), so the tab hashes with crypto.js and needs the key for the model."""
    base = tmp_path_factory.mktemp("browsercompute-lan")
    b = NamespacedNode("b", base / "b", {"models": {"backend": "numpy"}},
                       prefix=["ip", "netns", "exec", namespace], host=TAB_ADDRESS, key="lan-api-key")
    b.args = ["--join", Invite.create("lan", (b.api,)).to_token()]
    try:
        b.launch().wait_ready(180, ready=lambda health: health.get("status") == "ok")
        yield b
    finally:
        b.stop()


def test_a_page_outside_a_secure_context_serves_once_given_the_key(lan_node, tab):
    b = lan_node
    page = tab.browser.open(f"{b.url}/join#{b.args[1]}")
    try:
        page.wait_for("window.shoalMember && shoalMember.status.state === 'linked'", 30, "the page to join")
        assert page.evaluate("[isSecureContext, shoalMember.identity.webcrypto]") == [False, False]
        page.wait_for(f"{COMPUTE}.state === 'error'", 30, "the model list to be refused without the key")
        assert "invalid_api_key" in page.evaluate(f"{COMPUTE}.detail")
        page.evaluate("document.querySelector('#chat details').open = true")
        page.type_text("#api-key", b.key or "")
        page.evaluate("document.querySelector('#api-key').dispatchEvent(new Event('change'))")
        page.wait_for(f"{COMPUTE}.state === 'ready'", 300, "the model, hashed with crypto.js")
        me = page.evaluate("shoalMember.identity.id")
        case = CASES["capital"]
        assert "error" not in b.call("PUT", "/v1/mesh/route", {"kind": "offload",
                                                              "stages": [{"peer": me, "layers": "0:30"}]})
        try:
            chunks = b.stream("/v1/chat/completions", {"model": MODEL, "messages": case["messages"],
                                                       "max_tokens": 16, "temperature": 0, "stream": True})
        finally:
            b.call("PUT", "/v1/mesh/route", {})
        assert route_of(chunks)["peers"] == [me]
        record = page.evaluate(f"{COMPUTE}.served[0]")
        assert record["prompt_ids"] == case["prompt_ids"] and record["tokens"] == case["tokens"]
        assert text_of(chunks, chat=True) == case["text"]
    finally:
        page.close()
