"""`shoal node` as a real process: refuses unsafe binds, requires its key, and shuts down gracefully on
SIGTERM with a stream in flight (the stream ends cleanly, the port is released)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.mesh.api_harness import BACKEND, NodeThread, chat_body, free_env, make_config
from tests.nodes import NodeProcess

pytestmark = pytest.mark.timeout(300)


def shoal(*args: str) -> list[str]:
    return [sys.executable, "-m", "shoal.mesh", *args]


def test_non_loopback_without_key_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        shoal("node", "--api", "0.0.0.0:0", "--data-dir", str(tmp_path)),
        env=free_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "requires an API key" in result.stderr and "0.0.0.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[api]\nport = 'x'\n")
    result = subprocess.run(
        shoal("node", "--config", str(config)), env=free_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "[api] port must be an integer" in result.stderr


@pytest.fixture
def keyed_node(tmp_path: Path) -> Iterator[NodeThread]:
    config = make_config(tmp_path, api={"key": "correct-horse-battery"}, models={"preload": False})
    node = NodeThread(config).start(wait_ready=False)
    yield node
    node.stop()


async def test_api_key_is_required_when_set(keyed_node: NodeThread) -> None:
    url = keyed_node.url
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health") as r:
            assert r.status == 200  # liveness stays open
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-123"},
            {"Authorization": "correct-horse-battery"},
        ):
            async with session.get(url + "/v1/models", headers=headers) as r:
                assert r.status == 401
                body = await r.json()
                assert body["error"]["code"] == "invalid_api_key"
                assert body["error"]["type"] == "authentication_error"
        async with session.get(
            url + "/v1/models", headers={"Authorization": "Bearer correct-horse-battery"}
        ) as r:
            assert r.status == 200


async def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = await asyncio.to_thread(
            subprocess.run,
            shoal("node", "--api", f"127.0.0.1:{port}", "--data-dir", str(tmp_path)),
            env={**free_env(), "SHOAL_MODELS_PRELOAD": "false"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


async def test_sigterm_with_a_stream_in_flight(tmp_path: Path) -> None:
    node = NodeProcess("sigterm", tmp_path / "node",
                       {"api": {"shutdown_grace_s": 0}, "models": {"backend": BACKEND}}).launch()
    port, url = node.port, node.url
    try:
        await asyncio.to_thread(node.wait_ready, 240, lambda health: bool(health["models"]))
        async with aiohttp.ClientSession() as session:
            body = chat_body("Tell me a long story.", max_tokens=2000, stream=True)
            response = await session.post(url + "/v1/chat/completions", json=body)
            assert response.status == 200
            frames: list[bytes] = []
            async for line in response.content:
                if line.startswith(b"data: "):
                    frames.append(line[6:].strip())
                    if len(frames) == 2:
                        node.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            # With no grace the stream is cut at once: an error chunk naming the shutdown, then [DONE].
            assert frames[-1] == b"[DONE]"
            last = orjson.loads(frames[-2])
            assert last["error"]["code"] == "shutdown", last
            assert len(frames) < 2000
            returncode = await asyncio.to_thread(node.wait, 60)
        assert returncode == 0, node.log_tail(2000)
        assert "Traceback" not in node.log_tail(10**7)
        with socket.socket() as sock:  # nothing listens any more, and a new server may take the port
            assert sock.connect_ex(("127.0.0.1", port)) != 0
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:
        node.kill()


async def test_stop_lets_a_short_stream_finish(tmp_path: Path) -> None:
    node = NodeThread(make_config(tmp_path, api={"shutdown_grace_s": 120.0})).start()
    try:
        async with aiohttp.ClientSession() as session:
            events = await session.get(node.url + "/v1/events")
            assert events.status == 200
            body = chat_body("Name a colour.", max_tokens=6, temperature=0, stream=True,
                             stream_options={"include_usage": True})
            response = await session.post(node.url + "/v1/chat/completions", json=body)
            assert response.status == 200
            first = await response.content.readline()
            assert first.startswith(b"data: ")
            stopping = asyncio.ensure_future(asyncio.to_thread(node.stop))
            frames = [first[6:].strip()]
            async for line in response.content:
                if line.startswith(b"data: "):
                    frames.append(line[6:].strip())
            await stopping
            kinds = [orjson.loads(line[6:])["kind"] async for line in events.content
                     if line.startswith(b"data: ")]
            assert "request.started" in kinds  # and the event stream ended as shutdown began
        assert frames[-1] == b"[DONE]"
        usage = orjson.loads(frames[-2])["usage"]
        final = orjson.loads(frames[-3])["choices"][0]
        assert final["finish_reason"] in ("length", "stop") and "error" not in orjson.loads(frames[-3])
        assert usage["completion_tokens"] == 6 or final["finish_reason"] == "stop"
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", node.node.port)) != 0
    finally:
        node.stop()


def test_unreadable_identity_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "identity").mkdir()
    (tmp_path / "identity" / "ed25519.pem").write_text("not a key")
    result = subprocess.run(shoal("node", "--api", "127.0.0.1:0", "--data-dir", str(tmp_path)),
                            env=free_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cannot load or create the identity" in result.stderr
    assert "Traceback" not in result.stderr
