"""The API refuses what a web page (DNS rebinding, cross-site requests) or a broken client could send: a real
node on loopback, driven by real HTTP clients (aiohttp, raw sockets, the `shoal publish` CLI)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from shoal.mesh.p2p.invite import Invite

from tests.mesh.api_harness import NodeThread, free_env, make_config

pytestmark = pytest.mark.timeout(120)
SECRET = base64.b64encode(b"k" * 32).decode()
UPLOAD_LIMIT = 3 << 20


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("publishable")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, published_dir: Path) -> Iterator[NodeThread]:
    config = make_config(
        tmp_path_factory.mktemp("guard-node"),
        api={"read_timeout_s": 1.0, "allowed_origins": ["https://app.example"]},
        models={"preload": False},
        mesh={"secret": SECRET},
        ipfs={"publish_dirs": [str(published_dir)], "max_upload_bytes": UPLOAD_LIMIT},
    )
    started = NodeThread(config).start(wait_ready=False)
    yield started
    started.stop()


async def call(node: NodeThread, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, node.url + path, **kwargs) as r:
        raw = await r.read()
        return r.status, (json.loads(raw) if raw else None), r.headers


def code_of(body: Any) -> str | None:
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]["code"]


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "shoal.mesh", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=free_env())


def raw_exchange(node: NodeThread, data: bytes, wait_s: float = 30.0) -> bytes:
    """Send `data` on a fresh connection and read until the node closes it (or `wait_s` passes)."""
    with socket.create_connection((node.node.host, node.node.port), timeout=wait_s) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received + b"<timeout>"
            if not chunk:
                return received
            received += chunk


def raw_post(node: NodeThread, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    host = f"127.0.0.1:{node.node.port}"
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    answer = raw_exchange(node, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload)


# --- DNS rebinding and cross-site requests --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/mesh/invite", "/v1/node", "/health", "/v1/models"])
async def test_a_rebound_host_name_is_refused(node: NodeThread, path: str) -> None:
    status, body, _ = await call(node, "GET", path, headers={"Host": f"attacker.example:{node.node.port}"})
    assert status == 403 and code_of(body) == "host_not_allowed"
    for host in (f"127.0.0.1:{node.node.port}", f"localhost:{node.node.port}", "localhost"):
        status, body, _ = await call(node, "GET", path, headers={"Host": host})
        assert status == 200, (host, body)


async def test_signalling_answers_any_host_but_no_web_page(node: NodeThread) -> None:
    """A joiner may dial the bootstrap name its invite holds; the offer carries its own proof."""
    other = {"Host": f"laptop.local:{node.node.port}"}
    status, body, _ = await call(node, "GET", "/v1/mesh/signal", headers=other)
    assert status == 400 and "websocket" in body["error"]["message"].lower()  # past the guard: not an upgrade
    status, body, _ = await call(node, "GET", "/v1/mesh/signal",
                                 headers={**other, "Origin": "http://laptop.local:1"})
    assert status == 403 and code_of(body) == "origin_not_allowed"


async def test_cross_origin_text_plain_post_is_refused(node: NodeThread, published_dir: Path) -> None:
    target = published_dir / "weights.bin"
    target.write_bytes(b"secret weights")
    body = json.dumps({"path": str(target)})
    page = {"Origin": "http://attacker.example", "Content-Type": "text/plain"}
    status, answer, _ = await call(node, "POST", "/v1/models/publish", data=body, headers=page)
    assert status == 403 and code_of(answer) == "origin_not_allowed"
    # no Origin (an old browser, a no-cors fetch): Sec-Fetch-Site tells; a local app: only the type is wrong
    fetch = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Content-Type": "text/plain"}
    status, answer, _ = await call(node, "POST", "/v1/models/publish", data=body, headers=fetch)
    assert status == 403 and code_of(answer) == "origin_not_allowed"
    status, answer, _ = await call(node, "POST", "/v1/models/publish", data=body,
                                   headers={"Content-Type": "text/plain"})
    assert status == 415 and code_of(answer) == "unsupported_media_type"
    status, answer, _ = await call(node, "PUT", "/v1/policy", data=b'{"serve_others": false}')
    assert status == 415 and code_of(answer) == "unsupported_media_type"
    status, policy, _ = await call(node, "GET", "/v1/policy")
    assert policy["serve_others"] is True


async def test_same_origin_and_allowed_origins_pass(node: NodeThread) -> None:
    own = {"Origin": f"http://127.0.0.1:{node.node.port}"}
    status, body, headers = await call(node, "PUT", "/v1/policy", json={"battery_floor": 30}, headers=own)
    assert status == 200 and body["battery_floor"] == 30
    assert "Access-Control-Allow-Origin" not in headers
    app = {"Origin": "https://app.example"}
    status, body, headers = await call(node, "GET", "/v1/node", headers=app)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    preflight = {**app, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    status, _, headers = await call(node, "OPTIONS", "/v1/models/pull", headers=preflight)
    assert status == 204 and "Content-Type" in headers["Access-Control-Allow-Headers"]
    status, body, _ = await call(node, "OPTIONS", "/v1/models/pull",
                                 headers={**preflight, "Origin": "https://app.example.evil"})
    assert status == 403 and code_of(body) == "origin_not_allowed"
    status, body, _ = await call(node, "GET", "/v1/node", headers={"Origin": "null"})
    assert status == 403 and code_of(body) == "origin_not_allowed"


async def test_a_forged_invite_from_another_origin_does_not_move_the_node(node: NodeThread) -> None:
    _, before, _ = await call(node, "GET", "/v1/mesh/peers")
    forged = Invite("evil", b"e" * 32, ("203.0.113.9:8740",)).to_token()
    for headers in ({"Origin": "http://attacker.example", "Content-Type": "text/plain"},
                    {"Host": "attacker.example", "Content-Type": "application/json"}):
        status, body, _ = await call(node, "POST", "/v1/mesh/join", data=json.dumps({"invite": forged}),
                                     headers=headers)
        assert status == 403, body
    status, body, _ = await call(node, "GET", "/v1/mesh/invite", headers={"Origin": "http://attacker.example"})
    assert status == 403 and "invite" not in body
    _, after, _ = await call(node, "GET", "/v1/mesh/peers")
    assert after["self"]["mesh"] == before["self"]["mesh"] is not None


# --- publish ---------------------------------------------------------------------------------------------


async def test_publish_refuses_paths_outside_publish_dirs(node: NodeThread, published_dir: Path,
                                                          tmp_path: Path) -> None:
    outside = tmp_path / "private.key"
    outside.write_bytes(b"not for the mesh")
    link = published_dir / "link-out"
    link.symlink_to(outside)
    for path in (str(outside), "/etc/passwd", str(link), str(published_dir / ".." / outside.name)):
        status, body, _ = await call(node, "POST", "/v1/models/publish", json={"path": path})
        assert status == 403 and code_of(body) == "path_not_allowed", (path, body)
    status, body, _ = await call(node, "POST", "/v1/models/publish", json={"path": "relative.bin"})
    assert status == 400 and body["error"]["param"] == "path"
    missing = str(published_dir / "nope")
    status, body, _ = await call(node, "POST", "/v1/models/publish", json={"path": missing})
    assert status == 404 and code_of(body) == "file_not_found"
    inside = published_dir / "inside.bin"
    inside.write_bytes(os.urandom(3000))
    status, body, _ = await call(node, "POST", "/v1/models/publish", json={"path": str(inside)})
    assert status == 200 and body["cid"].startswith("baf") and body["size"] == 3000


async def test_upload_publishes_the_same_cid_as_the_cli(node: NodeThread, tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(1_300_000))  # several 256 KiB leaves
    status, body, _ = await call(
        node, "POST", "/v1/models/publish", params={"name": "up-test", "filename": "model.bin"},
        data=source.read_bytes(), headers={"Content-Type": "application/octet-stream"},
    )
    assert status == 200, body
    assert body["name"] == "up-test" and body["size"] == 1_300_000
    cli = await asyncio.to_thread(shoal, "publish", str(source), "--data-dir", str(tmp_path / "cli"))
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == body["cid"]
    # the CLI's upload to a running node (here CIDv0, Kubo's default) gives the CID it computes in-process
    local = await asyncio.to_thread(shoal, "publish", str(source), "--cid-version", "0",
                                    "--data-dir", str(tmp_path / "cli"))
    sent = await asyncio.to_thread(shoal, "publish", str(source), "--cid-version", "0",
                                   "--api", f"127.0.0.1:{node.node.port}", "--name", "cli-v0")
    assert local.returncode == 0 and sent.returncode == 0, (local.stderr, sent.stderr)
    assert sent.stdout.strip() == local.stdout.strip() and local.stdout.startswith("Qm")
    _, models, _ = await call(node, "GET", "/v1/ipfs/models")
    assert any(m["cid"] == body["cid"] for m in models["models"])
    assert not list((node.node.config.data_dir / "uploads").iterdir())  # the temporary copy is gone


async def test_upload_refusals(node: NodeThread) -> None:
    octet = {"Content-Type": "application/octet-stream"}
    status, body, _ = await call(node, "POST", "/v1/models/publish", data=b"", headers=octet)
    assert status == 400 and code_of(body) == "empty_upload"
    status, body, _ = await call(node, "POST", "/v1/models/publish", params={"filename": "../x"},
                                 data=b"abc", headers=octet)
    assert status == 400 and body["error"]["param"] == "filename"
    status, body, _ = await call(node, "POST", "/v1/models/publish", params={"name": "Bad Name"},
                                 data=b"abc", headers=octet)
    assert status == 400 and body["error"]["param"] == "name"
    too_big = os.urandom(UPLOAD_LIMIT + 1)
    status, body, _ = await call(node, "POST", "/v1/models/publish", data=too_big, headers=octet)
    assert status == 413 and code_of(body) == "request_too_large"  # refused from Content-Length

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(too_big), 1 << 20):
            yield too_big[start:start + (1 << 20)]

    status, body, _ = await call(node, "POST", "/v1/models/publish", data=chunked(), headers=octet)
    assert status == 413 and code_of(body) == "request_too_large"  # refused while streaming
    assert not list((node.node.config.data_dir / "uploads").iterdir())


async def test_gateway_errors_keep_their_message(node: NodeThread) -> None:
    missing = "bafkreiaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    status, body, _ = await call(node, "GET", f"/ipfs/{missing}", params={"format": "raw"})
    assert status == 404 and code_of(body) == "block_not_found" and missing in body["error"]["message"]
    status, body, _ = await call(node, "GET", "/ipfs/not-a-cid", params={"format": "raw"})
    assert status == 400 and code_of(body) == "invalid_cid"
    status, body, _ = await call(node, "GET", f"/ipfs/{missing}", params={"format": "car", "dag-scope": "x"})
    assert status == 400 and body["error"]["param"] == "dag-scope"


async def test_a_non_gguf_model_file_is_a_422(node: NodeThread) -> None:
    status, body, _ = await call(node, "POST", "/v1/models/publish", params={"name": "junk-model"},
                                 data=b"PK\x03\x04 this is a zip, not a model" * 100,
                                 headers={"Content-Type": "application/octet-stream"})
    assert status == 200, body
    status, body, _ = await call(node, "POST", "/v1/models/junk-model/load")
    assert status == 422 and code_of(body) in ("invalid_model_file", "unsupported_model"), body


# --- broken bodies and slow clients ----------------------------------------------------------------------


@pytest.mark.parametrize(("encoding", "data"), [
    ("gzip", b"this is not gzip"),
    ("gzip", gzip.compress(b'{"model": "x"}')[:-6] + b"garbage!"),
    ("deflate", b"not deflate either"),
    ("br", b"\x00\x01 not brotli"),
    ("zstd", b"not zstd"),
])
def test_broken_encodings_are_400_json(node: NodeThread, encoding: str, data: bytes) -> None:
    status, body = raw_post(node, "/v1/chat/completions", data,
                            {"Content-Type": "application/json", "Content-Encoding": encoding})
    assert status == 400, body
    assert code_of(body) in ("invalid_encoding", "invalid_json"), body


@pytest.mark.parametrize(("request_bytes", "code"), [
    (b"GARBAGE\r\n\r\n", "bad_request"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " + b"a" * 20000 + b"\r\n\r\n", "header_too_large"),
    (b"POST /v1/policy HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n", "bad_request"),
    (b"POST /v1/policy HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "bad_request"),
])
def test_malformed_http_gets_a_json_400(node: NodeThread, request_bytes: bytes, code: str) -> None:
    head, _, payload = raw_exchange(node, request_bytes).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400") and b"application/json" in head, head
    assert code_of(json.loads(payload)) == code


def test_good_encodings_are_decoded(node: NodeThread) -> None:
    policy = b'{"battery_floor": 25}'
    for encoding, data in (("gzip", gzip.compress(policy)), ("deflate", zlib.compress(policy))):
        host = f"127.0.0.1:{node.node.port}"
        head = (f"PUT /v1/policy HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Encoding: {encoding}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        answer = raw_exchange(node, head.encode() + data)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_a_half_sent_body_is_timed_out(node: NodeThread) -> None:
    host = f"127.0.0.1:{node.node.port}"
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n")
    answer = raw_exchange(node, head.encode() + b'{"model": "x", "messages": [')
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b'"request_timeout"' in answer
    upload = (f"POST /v1/models/publish HTTP/1.1\r\nHost: {host}\r\n"
              "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n")
    answer = raw_exchange(node, upload.encode() + os.urandom(5000))
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]


def test_half_sent_headers_are_dropped(node: NodeThread) -> None:
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{node.node.port}\r\nX-Slow: "
    answer = raw_exchange(node, head.encode())
    assert not answer.endswith(b"<timeout>")  # the node closed the connection


def test_host_names_of_the_node() -> None:
    from shoal.mesh.api.guard import RequestGuard, is_loopback_name
    from shoal.mesh.node.config import ApiConfig

    api = ApiConfig(host="0.0.0.0", allowed_hosts=("fd00::5", "Box.LAN", "gpu.lan:8740"))
    guard = RequestGuard.from_settings(api, ["laptop.local:8740"])
    for host in ("[fd00::5]:8740", "box.lan:1", "BOX.LAN.", "gpu.lan", "laptop.local", "[::1]:80",
                 "127.0.0.2:5", "localhost", "a.localhost:9", "10.0.0.5:8740"):
        assert guard.host_allowed(host, "10.0.0.5"), host  # 10.0.0.5: the address the client reached
    for host in ("evil.example", "localhost.evil.example", "10.0.0.6", "127.0.0.1.nip.io", "::1", "a b",
                 "box.lan@evil.example", "[fd00::5"):
        assert not guard.host_allowed(host, "10.0.0.5"), host
    assert not guard.host_allowed("10.0.0.5", "::ffff:10.0.0.6")
    assert guard.host_allowed("10.0.0.6", "::ffff:10.0.0.6")  # IPv4 on a dual-stack socket
    assert is_loopback_name("::1") and not is_loopback_name("192.168.1.7")
    assert guard.origin_allowed("http://box.lan:8740", "box.lan:8740", secure=False)
    assert not guard.origin_allowed("https://box.lan:8740", "box.lan:8740", secure=False)
    assert not guard.origin_allowed("http://box.lan:8741", "box.lan:8740", secure=False)


async def test_uploads_a_killed_node_left_are_removed_at_start(tmp_path: Path) -> None:
    from shoal.mesh.ipfs.config import IpfsConfig
    from shoal.mesh.ipfs.service import STALE_TEMP_S, IpfsService

    old, fresh = tmp_path / "uploads" / "upload-old", tmp_path / "uploads" / "upload-fresh"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "model.gguf").write_bytes(b"partial")
    past = time.time() - STALE_TEMP_S - 60
    os.utime(old, (past, past))
    async with IpfsService(IpfsConfig(rpc_url=None), tmp_path):
        assert not old.exists() and fresh.exists()  # a fresh one may belong to a running node


def test_guard_settings_from_toml_and_env(tmp_path: Path) -> None:
    from shoal.mesh.node.config import ConfigError, load_config

    toml = tmp_path / "config.toml"
    toml.write_text('[api]\nallowed_origins = ["https://app.example"]\nread_timeout_s = 5\n'
                    '[ipfs]\npublish_dirs = ["/srv/models"]\n')
    config = load_config(toml, environ={"SHOAL_API_ALLOWED_HOSTS": "box.lan, gpu.lan"})
    assert config.api.allowed_hosts == ("box.lan", "gpu.lan")
    assert config.api.allowed_origins == ("https://app.example",) and config.api.read_timeout_s == 5.0
    assert config.ipfs.publish_dirs == ("/srv/models",)
    for section, values, words in (
        ("api", {"allowed_origins": ["app.example"]}, "allowed_origins"),
        ("api", {"allowed_origins": ["https://app.example/path"]}, "allowed_origins"),
        ("api", {"allowed_hosts": ["a/b"]}, "allowed_hosts"),
        ("api", {"read_timeout_s": 0}, "read_timeout_s"),
        ("ipfs", {"publish_dirs": ["relative/dir"]}, "publish_dirs"),
        ("ipfs", {"max_upload_bytes": 0}, "max_upload_bytes"),
    ):
        with pytest.raises(ConfigError, match=words):
            load_config(environ={}, overrides={section: values})
