"""Bounded fuzz of the HTTP API: random and mutated JSON bodies, headers (Host, Origin, Content-Type,
Content-Encoding, Sec-Fetch-*), and query strings, sent by a real HTTP client to a real node on loopback.
Nothing may answer 5xx or break the node: `/health` answers after every example."""

from __future__ import annotations

import gzip
import http.client
import json
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.mesh.api_harness import NodeThread, make_config

pytestmark = pytest.mark.timeout(300)

ENDPOINTS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("PUT", "/v1/policy"),
    ("POST", "/v1/models/pull"),
    ("POST", "/v1/models/publish"),
    ("POST", "/v1/models/publish?name=fuzz-up&filename=f.gguf"),
    ("POST", "/v1/mesh/join"),
    ("POST", "/v1/models/fuzz-missing/load"),
    ("POST", "/v1/models/fuzz-missing/compile"),
    ("GET", "/v1/logs"),
    ("GET", "/v1/mesh/requests"),
    ("GET", "/ipfs/bafkreiaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ("GET", "/v1/node"),
    ("DELETE", "/v1/policy"),
]
HEADER_TEXT = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40)
JSON_LEAVES = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(
    max_size=30
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
CHAT_KEYS = ["model", "messages", "max_tokens", "temperature", "top_p", "stream", "stop", "n", "seed",
             "prompt", "invite", "path", "name", "target", "layers", "serve_others", "battery_floor",
             "stream_options"]
ENCODINGS = ["gzip", "deflate", "br", "zstd", "identity"]
CONTENT_TYPES = ["application/json", "text/plain", "application/octet-stream", "multipart/form-data",
                 "application/x-www-form-urlencoded", "application/json; charset=utf-8",
                 "application/merge-patch+json"]
BODIES = st.one_of(
    JSON_VALUES,
    st.dictionaries(st.sampled_from(CHAT_KEYS), JSON_VALUES, max_size=6),
    st.builds(lambda content, extra: {"messages": [{"role": "user", "content": content}], **extra},
              JSON_VALUES, st.dictionaries(st.sampled_from(CHAT_KEYS[2:]), JSON_VALUES, max_size=3)),
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeThread]:
    config = make_config(
        tmp_path_factory.mktemp("fuzz-node"),
        api={"read_timeout_s": 2.0},
        models={"preload": False, "default": "fuzz-missing", "backend": "numpy"},
        ipfs={"max_upload_bytes": 16},  # many random uploads cross it
    )
    started = NodeThread(config).start(wait_ready=False)
    yield started
    started.stop()


def encode(body: Any, raw: bytes | None, encoding: str | None) -> bytes:
    data = raw if raw is not None else json.dumps(body).encode()
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    return data  # identity, or an encoding that does not match the bytes (br, zstd, made-up)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes]:
    method, path = draw(st.sampled_from(ENDPOINTS))
    query = draw(st.dictionaries(st.sampled_from(["limit", "level", "format", "name", "filename", "replay"]),
                                 HEADER_TEXT, max_size=2))
    if query:
        path += ("&" if "?" in path else "?") + urlencode(query)
    headers: dict[str, str] = {}
    wellformed = draw(st.integers(0, 9)) < 7  # most requests pass the guard, so the handlers get fuzzed too
    if wellformed:
        upload = path.startswith("/v1/models/publish") and draw(st.booleans())
        headers["Content-Type"] = "application/octet-stream" if upload else "application/json"
    elif draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(CONTENT_TYPES) | HEADER_TEXT)
    encoding = None
    if not wellformed or draw(st.integers(0, 5)) == 0:
        encoding = draw(st.none() | st.sampled_from(ENCODINGS) | HEADER_TEXT)
    if encoding:
        headers["Content-Encoding"] = encoding
    for name in ("Host", "Origin", "Sec-Fetch-Site", "Sec-Fetch-Mode", "Authorization", "Accept"):
        if not wellformed and draw(st.integers(0, 3)) == 0:
            headers[name] = draw(HEADER_TEXT)
    raw = None
    if not wellformed or draw(st.integers(0, 9)) == 0:
        raw = draw(st.none() | st.binary(max_size=200))
    body = encode(draw(BODIES), raw, encoding) if method != "GET" or draw(st.booleans()) else b""
    return method, path, headers, body


def send(node: NodeThread, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(node.node.host, node.node.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(requests())
def test_no_request_gets_a_5xx(node: NodeThread, request: tuple[str, str, dict[str, str], bytes]) -> None:
    status, body = send(node, *request)
    event(f"HTTP {status}")
    if request[1].startswith("/v1/models/publish") and request[2].get("Content-Type", "").endswith("stream"):
        event(f"upload: HTTP {status}")
    assert status < 500, (request, status, body[:500])
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert "Traceback" not in error["message"]
    health_status, _ = send(node, "GET", "/health", {}, b"")
    assert health_status == 200
