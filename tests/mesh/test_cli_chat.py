"""`shoal chat`: streams through a running node when one answers, else runs the model in-process."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import aiohttp
import pytest

from tests.mesh.api_harness import BACKEND, MODEL, NodeThread, free_env

pytestmark = pytest.mark.timeout(300)

PROMPT = "What is the capital of France?"


def shoal(*args: str) -> list[str]:
    return [sys.executable, "-m", "shoal.mesh", *args]


async def greedy_answer(node: NodeThread, max_tokens: int) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0}
    async with (
        aiohttp.ClientSession() as session,
        session.post(node.url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200
        return (await r.json())["choices"][0]["message"]["content"]


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, shoal(*args), env=free_env(), capture_output=True, text=True, timeout=240
    )


async def test_chat_through_a_running_node(node: NodeThread) -> None:
    expected = await greedy_answer(node, 5)
    before = {r["id"] for r in node.node.requests.recent()}
    result = await run("chat", PROMPT, "--api", node.url, "--max-tokens", "5", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    new = [r for r in node.node.requests.recent() if r["id"] not in before]
    assert len(new) == 1 and 1 <= new[0]["tokens"] <= 5  # it really went through the node


async def test_chat_in_process_gives_the_same_answer(node: NodeThread) -> None:
    expected = await greedy_answer(node, 3)
    result = await run("chat", PROMPT, "--local", "--backend", BACKEND, "--max-tokens", "3",
                       "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


async def test_chat_reports_a_missing_node_and_bad_arguments() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await run("chat", "hi", "--api", f"http://127.0.0.1:{port}")
    assert result.returncode == 2
    assert "no shoal node answers" in result.stderr
    result = await run("chat", "hi", "--max-tokens", "0")
    assert result.returncode == 2 and "--max-tokens must be at least 1" in result.stderr


async def test_chat_reports_the_node_error(node: NodeThread) -> None:
    result = await run("chat", PROMPT, "--api", node.url, "--model", "no-such-model")
    assert result.returncode == 2
    assert "no-such-model" in result.stderr and "does not exist" in result.stderr


async def test_chat_shows_why_it_waits_on_stderr(tmp_path) -> None:
    """A node that loads its model on first use: `shoal chat` shows the node's progress reports on one
    self-overwriting stderr line (cleared when the answer starts), and stdout holds only the answer."""
    from tests.mesh.api_harness import make_config, slow_load

    node = NodeThread(make_config(tmp_path, models={"preload": False}), load_fn=slow_load(2.5)).start()
    try:
        result = await run("chat", PROMPT, "--api", node.url, "--max-tokens", "3", "--temperature", "0")
    finally:
        node.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "shoal progress" not in result.stdout
    assert f"loading {MODEL} here (" in result.stderr, result.stderr[-500:]  # (text mode reads \r as \n)
    print(f"stderr while waiting: {result.stderr[:120]!r}")
