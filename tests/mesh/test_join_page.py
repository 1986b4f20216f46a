"""The join page's server side, without a browser (tests/mesh/test_browser_member.py drives one): a real node
with an API key serves `GET /join` and its modules without the key, with a strict CSP; the invite route gives
the join URL (its QR code encodes it); a join URL parses as its invite; adverts keep a member's `kind`."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from shoal.mesh.api import join_page
from shoal.mesh.p2p.gossip import clean_advert
from shoal.mesh.p2p.invite import Invite, join_url

from tests.mesh.api_harness import NodeThread, make_config

pytestmark = pytest.mark.timeout(120)
KEY = "join-page-test-key"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeThread]:
    secret = base64.b64encode(b"j" * 32).decode()
    config = make_config(tmp_path_factory.mktemp("join-node"), api={"key": KEY}, models={"preload": False},
                         mesh={"secret": secret})
    started = NodeThread(config).start(wait_ready=False)
    yield started
    started.stop()


async def fetch(node: NodeThread, path: str, **kwargs: Any) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as session, session.get(node.url + path, **kwargs) as r:
        return r.status, await r.read(), r.headers


async def test_page_and_modules_are_served_without_the_key_with_a_strict_policy(node):
    status, body, headers = await fetch(node, "/join")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script type="module" src="/join/join.js">' in body
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "http" not in policy
    assert headers["Referrer-Policy"] == "no-referrer"
    for name in ("join.js", "member.js", "mesh.js", "link.js", "crypto.js"):
        status, body, headers = await fetch(node, f"/join/{name}")
        assert status == 200 and headers["Content-Type"].startswith("text/javascript"), name
        imports = re.findall(rb'^import .* from "([^"]+)";', body, re.MULTILINE)
        assert all(spec.startswith(b"./") for spec in imports), f"{name} must load nothing from elsewhere"
        assert b"fetch(\"http" not in body and b"new WebSocket(\"" not in body
    status, body, _ = await fetch(node, "/join/secrets.txt")  # not a page file: the API key applies
    assert status == 401
    status, body, _ = await fetch(node, "/join/secrets.txt", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_url"
    status, body, _ = await fetch(node, "/v1/mesh/peers")  # the rest of the API still wants the key
    assert status == 401


async def test_page_is_not_served_to_another_site(node):
    status, body, _ = await fetch(node, "/join/join.js", headers={"Origin": "https://evil.example"})
    assert status == 403 and json.loads(body)["error"]["code"] == "origin_not_allowed"


async def test_invite_route_gives_the_join_url_and_its_qr(node):
    auth = {"Authorization": f"Bearer {KEY}"}
    status, body, _ = await fetch(node, "/v1/mesh/invite?qr=1", headers=auth)
    assert status == 200
    view = json.loads(body)
    address = node.url.removeprefix("http://").rstrip("/")
    assert view["url"] == join_url(address, view["invite"]) == f"http://{address}/join#{view['invite']}"
    assert view["qr"].count("\n") > 10
    assert Invite.from_token(view["url"]) == Invite.from_token(view["invite"])


def test_a_join_url_parses_as_its_invite():
    invite = Invite.create("home", ("10.0.0.2:8740",))
    assert Invite.from_token(join_url("10.0.0.2:8740", invite.to_token())) == invite
    assert join_page.PATHS >= {"/join", "/join/join.js", "/join/mesh.js", "/join/member.js", "/join/link.js"}


def test_adverts_keep_a_members_kind():
    assert clean_advert({"kind": "browser"})["kind"] == "browser"
    assert clean_advert({"kind": "toaster"})["kind"] == "node"
    assert clean_advert({})["kind"] == "node"


def test_cli_shows_the_join_url_and_its_qr(capsys):
    from shoal.mesh.commands.mesh import _show

    token = Invite.create("home", ("10.0.0.2:8740",)).to_token()
    url = join_url("10.0.0.2:8740", token)
    _show(token, True, url)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == token and lines[1] == f"join page: {url}"
    assert any("▀" in line or "▄" in line for line in lines) and "browser" in lines[-1]
    _show(token, False, url)  # --no-qr: the token only, as before
    assert capsys.readouterr().out == token + "\n"


async def test_vendored_wllama_is_served_where_installed_and_only_then(node, tmp_path, monkeypatch):
    """`scripts/install_wllama.sh` vendors wllama into static/join/vendor/ (git-ignored): served without the
    key as wasm and JavaScript when there, 404 when not (the page then joins and chats without compute)."""
    static = tmp_path / "static" / "join"
    (static / "vendor" / "wllama").mkdir(parents=True)
    (static / "vendor" / "wllama" / "wllama.wasm").write_bytes(b"\0asm\x01\0\0\0")
    monkeypatch.setattr(join_page, "STATIC", static)
    status, body, headers = await fetch(node, "/join/vendor/wllama/wllama.wasm")
    assert status == 200 and body == b"\0asm\x01\0\0\0" and headers["Content-Type"] == "application/wasm"
    assert "'wasm-unsafe-eval'" in headers["Content-Security-Policy"]
    status, body, _ = await fetch(node, "/join/vendor/wllama/index.js")  # not installed in this folder
    assert status == 404 and json.loads(body)["error"]["code"] == "not_vendored"
    status, _, _ = await fetch(node, "/join/vendor/other/x.js")
    assert status == 401  # only the listed files are page paths
    policy = (await fetch(node, "/join"))[2]["Content-Security-Policy"]
    assert "script-src 'self' 'wasm-unsafe-eval'" in policy and "worker-src blob:" in policy
