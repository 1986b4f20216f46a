"""A browser tab as a mesh member (`GET /join`, mesh/api/static/join/): Debian's Chromium, headless, inside a
network namespace this test makes (`lo` and a veth pair inside it: no packet leaves it), driven over the
DevTools protocol on a pipe (`tests.mesh.chromium`). Two real `shoal node` processes run in the namespace.

Two tabs join with the invite in their URL fragment, link to both nodes and to each other, and both nodes
list them as `browser` members; a chat typed in a page streams an answer through its linked node and shows
the route; a page holding a wrong invite is refused; a tab's malformed frames are strikes as any peer's;
closing a tab is seen as a departure. A screenshot of the page after an offloaded chat is kept in
`.cache/artifacts/join-page.png` (or `$SHOAL_TEST_ARTIFACTS`).
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from shoal.mesh.p2p.invite import Invite

from tests.mesh import chromium
from tests.mesh.browser_harness import TAB_ADDRESS, NamespacedNode, browser_namespace, wait, why_not
from tests.nodes import REPO

pytestmark = pytest.mark.timeout(240)
DEAD_TIMEOUT_S = 4.0
ANSWERED = ("['done', 'error'].includes(document.querySelector('#answer').dataset.state) && "
            "document.querySelector('#answer').dataset.state")
"""The answer's final state, once the page has one."""
ARTIFACTS = Path(os.environ.get("SHOAL_TEST_ARTIFACTS", REPO / ".cache" / "artifacts"))


@pytest.fixture(scope="module")
def namespace():
    reason = why_not()
    if reason:
        pytest.skip(f"browser member tests need chromium and network namespaces: {reason}")
    with browser_namespace() as name:
        yield name


@pytest.fixture(scope="module")
def nodes(namespace, tmp_path_factory):
    base = tmp_path_factory.mktemp("browsermesh")
    prefix = ["ip", "netns", "exec", namespace]
    mesh = {"heartbeat_interval_s": 1.0, "dead_timeout_s": DEAD_TIMEOUT_S}
    # a keeps what it can serve (prefer_local): the first chat's route is then `local`, whatever placement
    # predicts on a loaded machine (the chromium tabs share its two cores); the offload test forces its route
    a = NamespacedNode("a", base / "a", {"models": {"backend": "numpy"}, "mesh": mesh,
                                         "policy": {"prefer_local": True}}, prefix=prefix)
    # b's API listens on the namespace's other address: a page it serves is no secure context (as on a phone
    # that opens http://LAN-ADDRESS/join), so it signs and verifies with crypto.js, not WebCrypto
    b = NamespacedNode("b", base / "b", {"models": {"backend": "numpy", "preload": False}, "mesh": mesh},
                       prefix=prefix, host=TAB_ADDRESS, key="b-api-key")  # (a key: not on loopback)
    invite = Invite.create("browsers", (a.api,))
    a.args = b.args = ["--join", invite.to_token()]
    started: list[NamespacedNode] = []
    try:
        for node in (a, b):
            started.append(node.launch())
        for node in started:
            node.wait_ready(180, ready=lambda health: health.get("status") == "ok")
        deadline = time.monotonic() + 60
        while b.peer_id not in a.members():
            assert time.monotonic() < deadline, "the two nodes did not link"
            time.sleep(0.2)
        yield a, b, invite
    finally:
        for node in started:
            node.stop()


@pytest.fixture(scope="module")
def browser(namespace, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    instance = chromium.Chromium.launch(profile, prefix=["ip", "netns", "exec", namespace],
                                        log=profile.parent / "chromium.log")
    try:
        yield instance
    finally:
        instance.close()


def _join(browser: chromium.Chromium, url: str) -> chromium.Tab:
    tab = browser.open(url)
    tab.wait_for("window.shoalMember && shoalMember.status.state === 'linked'", 30, f"{url[:40]} to join")
    # every link the tab loses, with its reason (the departure test names any it did not expect)
    tab.evaluate("window.linksLeft = []; shoalMember.addEventListener('left', "
                 "e => linksLeft.push({...e.detail, at: performance.now()}))")
    return tab


@pytest.fixture(scope="module")
def pages(nodes, browser):
    """Two members in one browser: the page as node `a` serves it, and as node `b` serves it (another origin,
    so another identity in IndexedDB — as another device would have)."""
    a, b, invite = nodes
    token = invite.to_token()
    # (not serving: these tests are about membership and chat; tests/mesh/test_browser_compute.py serves)
    return (_join(browser, f"{a.url}/join?serve=off#{token}"),
            _join(browser, f"{b.url}/join?serve=off#{token}"))


@pytest.fixture(scope="module")
def page(pages):
    return pages[0]


def test_pages_join_and_both_nodes_list_them_as_browsers(nodes, pages):
    a, b, invite = nodes
    ids = [tab.evaluate("shoalMember.identity.id") for tab in pages]
    assert [tab.evaluate("[isSecureContext, shoalMember.identity.webcrypto]") for tab in pages] == [
        [True, True], [False, False]]
    assert ids[0] != ids[1]
    assert all(tab.evaluate("shoalMember.membership.mesh") == invite.mesh_id for tab in pages)
    # each is linked to the node that served it by its WebSocket, to the rest by peer exchange (offers relayed
    # over links): the two nodes and the other tab
    for tab, other in zip(pages, reversed(ids), strict=True):
        wanted = json.dumps([a.peer_id, b.peer_id, other])
        tab.wait_for(f"{wanted}.every(id => shoalMember.links.get(id)?.state === 'connected')", 30,
                     "links to both nodes and the other tab")
    for node in (a, b):
        for me, tab in zip(ids, pages, strict=True):
            entry = wait(lambda node=node, me=me: node.members().get(me), 20, f"{node.name} to list a tab")
            assert entry["kind"] == "browser" and entry["advert"]["kind"] == "browser"
            assert entry["admitted"] == "secret"
            assert entry["name"] == tab.evaluate("shoalMember.identity.name")
            wait(lambda node=node, me=me: (node.members().get(me) or {}).get("rtt_ms") is not None, 20,
                  "heartbeats")
    def tabs_linked() -> dict[str, Any] | None:
        view = a.get("/v1/mesh/topology")
        return view if any({link["a"], link["b"]} == set(ids) for link in view["links"]) else None

    topology = wait(tabs_linked, 20, "the tabs' own link in the topology")
    kinds = {n["id"]: n["kind"] for n in topology["nodes"]}
    assert kinds[ids[0]] == kinds[ids[1]] == "browser" and kinds[a.peer_id] == kinds[b.peer_id] == "node"
    shown = pages[0].evaluate("[...document.querySelectorAll('#members tbody tr')].map(r => r.dataset.kind)")
    assert sorted(shown) == ["browser", "node", "node"]
    # the invite (its secret) stayed in the tabs: no request URL or body, no WebSocket frame carried it
    secret_b64 = base64.b64encode(invite.secret).decode()
    sent = [item for tab in pages for item in tab.sent()]
    assert any('"op":"offer"' in item for item in sent) and any("/join/join.js" in item for item in sent)
    assert not [item for item in sent if invite.to_token()[8:40] in item or secret_b64 in item]


def test_chat_typed_in_the_page_streams_an_answer_with_its_route(nodes, page):
    page.wait_for("document.querySelector('#model').options.length > 0", 30, "the model list")
    page.evaluate("""(() => {
        window.answerUpdates = [];
        new MutationObserver(() => answerUpdates.push(document.querySelector('#answer').textContent))
            .observe(document.querySelector('#answer'),
                     {childList: true, characterData: true, subtree: true});
    })()""")
    page.type_text("#prompt", "Name the capital of France in one sentence.")
    page.press_enter()
    state = page.wait_for("['done', 'error'].includes(document.querySelector('#answer').dataset.state) && "
                          "document.querySelector('#answer').dataset.state", 180, "the answer")
    route = page.evaluate("document.querySelector('#route').textContent")
    assert state == "done", route
    answer = page.evaluate("document.querySelector('#answer').textContent")
    updates = page.evaluate("answerUpdates.filter(t => t.length > 0)")
    assert answer.strip() and len(set(updates)) >= 2, (answer, updates)  # it arrived in pieces
    assert route == "route: local — answered by a", route


def test_the_page_shows_an_offloaded_answers_route(nodes, page):
    a, b, _ = nodes
    assert "error" not in a.call("PUT", "/v1/mesh/route", {"kind": "offload",
                                                          "stages": [{"peer": b.peer_id, "layers": "0:30"}]})
    try:
        page.evaluate("document.querySelector('#answer').dataset.state = 'idle'")
        page.evaluate("document.querySelector('#chat-form').requestSubmit()")  # the same question again
        state = page.wait_for(ANSWERED, 180, "the offloaded answer")
        route = page.evaluate("document.querySelector('#route').textContent")
        assert state == "done" and route == "route: offload — a → b [0:30]", route
        shot = page.screenshot(ARTIFACTS / "join-page.png")
        print(f"screenshot of the page after an offloaded chat: {shot}")
    finally:
        a.call("PUT", "/v1/mesh/route", {})


def test_a_page_from_another_device_chats_only_with_the_nodes_key(nodes, pages):
    _, b, _ = nodes
    tab = pages[1]  # served by b on its non-loopback address, as to a phone
    tab.type_text("#prompt", "Name the capital of France in one sentence.")
    tab.press_enter()
    tab.wait_for("document.querySelector('#answer').dataset.state === 'error'", 30, "the refusal")
    assert "(invalid_api_key)" in tab.evaluate("document.querySelector('#route').textContent")
    tab.evaluate("document.querySelector('#chat details').open = true")  # as a click on "API key" does
    tab.type_text("#api-key", b.key or "")
    tab.evaluate("document.querySelector('#api-key').dispatchEvent(new Event('change'))")
    tab.wait_for("document.querySelector('#model').options.length > 0", 30, "the model list, with the key")
    tab.evaluate("document.querySelector('#chat-form').requestSubmit()")
    state = tab.wait_for("['done', 'error'].includes(document.querySelector('#answer').dataset.state) && "
                         "document.querySelector('#answer').dataset.state", 180, "the answer")
    route = tab.evaluate("document.querySelector('#route').textContent")
    assert state == "done" and route.startswith("route: "), route
    assert tab.evaluate("document.querySelector('#answer').textContent").strip()
    print(f"chat from the non-loopback page: {route}")


def test_tabs_relink_when_a_node_restarts(nodes, pages):
    """The tab served by `b` redials it (as nodes redial their bootstrap addresses); the other tab relinks by
    peer exchange."""
    _, b, _ = nodes
    ids = [tab.evaluate("shoalMember.identity.id") for tab in pages]
    b.stop()
    for tab in pages:
        tab.wait_for(f"!shoalMember.links.has({json.dumps(b.peer_id)})", 10, "b's departure")
    pages[1].wait_for("shoalMember.rejoinMs > 1000", 10, "the tab to redial b")
    b.start(120)
    for tab in pages:
        tab.wait_for(f"shoalMember.links.get({json.dumps(b.peer_id)})?.state === 'connected'", 60,
                     "the link to the restarted node")
    wait(lambda: set(ids) <= set(b.members()), 20, "b to list both tabs again")
    # the tab b served is linked to it again — by its own rejoin through b's signalling or by peer exchange,
    # whichever came first — and its back-off, doubled by the failed tries, is reset
    pages[1].wait_for("shoalMember.rejoinTimer === null && shoalMember.rejoinMs === 1000", 30, "the rejoin")
    assert pages[1].evaluate("[shoalMember.status.state, shoalMember.homeId]") == ["linked", b.peer_id]
    # crossed dials on b's return (a tab's rejoin, peer exchange from either side) left one link per pair at
    # both ends, the same one: no tab lost its link to b again (`keeps_existing_link`)
    for tab in pages:
        left = [entry for entry in tab.evaluate("linksLeft") if entry["id"] == b.peer_id]
        assert [entry["reason"] for entry in left] == ["peer said bye"], left


def test_page_without_a_usable_invite_says_so(nodes, browser):
    a, _, invite = nodes
    cut = invite.to_token()[:-6]  # cut off, as a mangled QR code or copy could be
    for fragment, state, words in (("", "no-invite", "no invite"), (cut, "error", "cut off")):
        tab = browser.open(f"{a.url}/join#{fragment}")
        try:
            status = "document.querySelector('#status')"
            shown = tab.wait_for(f"{status}.dataset.state === {json.dumps(state)} && {status}.textContent",
                                 20, f"the {state} state")
            assert words in shown and tab.evaluate("!document.querySelector('#invite-box').hidden")
            assert tab.evaluate("window.shoalMember === undefined")
        finally:
            tab.close()


def test_page_with_a_wrong_invite_is_refused(nodes, browser):
    a, b, invite = nodes
    # the right mesh id and expiry, but a key that is not derived from the mesh secret; `localhost` is a
    # third origin, so the page has an identity of its own
    wrong = Invite(invite.name, os.urandom(32), invite.bootstrap, int(time.time()) + 600, invite.mesh_id)
    tab = browser.open(f"http://localhost:{a.port}/join#{wrong.to_token()}")
    try:
        tab.wait_for("window.shoalMember && shoalMember.status.state === 'refused'", 30, "the refusal")
        assert tab.evaluate("shoalMember.status.code") == "not_member"
        assert tab.evaluate("document.querySelector('#status').dataset.state") == "refused"
        intruder = tab.evaluate("shoalMember.identity.id")
        assert intruder not in a.members() and intruder not in b.members()
        assert any(r["from"] == intruder for r in a.get("/v1/mesh/peers")["refused"])
    finally:
        tab.close()


def test_a_tabs_frames_are_checked_like_any_peers(nodes, pages):
    a, _, _ = nodes
    tab = pages[1]
    me = tab.evaluate("shoalMember.identity.id")
    before = a.members()[me]["abuse"]
    link = f"shoalMember.links.get({json.dumps(a.peer_id)})"
    for frame in ('{"v": 1, "t": "no.such.type"}', "not json", '{"v": 1, "t": "ping", "b": [1]}'):
        tab.evaluate(f"{link}.channels.control.send({json.dumps(frame)})")
    wait(lambda: a.members()[me]["abuse"] == before + 3, 10, "three strikes against the tab")
    assert tab.evaluate(f"{link}.state") == "connected"  # under the abuse limit


def test_closing_a_tab_is_a_departure(nodes, pages):
    a, b, _ = nodes
    page, other = pages
    me = page.evaluate("shoalMember.identity.id")
    for node in (a, b):  # (b restarted in an earlier test: both tabs are linked to it again)
        wait(lambda node=node: me in node.members(), 20, f"{node.name} to list the tab")
    other.evaluate("linksLeft.length = 0")
    page.close()
    budget = 2 * DEAD_TIMEOUT_S  # a deadline for the poll; the page says bye, so it is seen well before
    for node in (a, b):
        wait(lambda node=node: me not in node.members(), budget, f"{node.name} to see the tab leave")
        departed = [d for d in node.get("/v1/mesh/peers")["departed"] if d["id"] == me]
        # the bye is best effort: an unloading page closes its connections right after sending it, and
        # under load the browser may tear the channel down first — then the channel's close is the departure
        assert departed and departed[-1]["reason"] in ("peer said bye", "control channel closed"), departed
    other.wait_for(f"!shoalMember.links.has({json.dumps(me)})", budget, "the other tab to see it leave")
    # the other tab keeps its links to both nodes: any link it lost meanwhile is named with its reason
    left = other.evaluate("linksLeft")
    assert [entry["id"] for entry in left] == [me], (left, other.console()[-20:])
    assert sorted(other.evaluate("[...shoalMember.links.keys()]")) == sorted([a.peer_id, b.peer_id])

