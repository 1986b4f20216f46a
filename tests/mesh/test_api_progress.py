"""No silent waits: a streamed request that waits says why, as SSE comments the official client skips.

A node with a small KV cache: one streamed answer holds the whole cache, so the next streamed request queues
for room; its stream opens within about a second with `: shoal progress {...}` comments naming the queue, and
the official `openai` client, reading the same kind of stream, gets a normal answer. The pump itself is
checked on a real event bus (compile progress of the model forwarded, of other models not).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from shoal.mesh.api.progress import PREFIX, ProgressFeed, ProgressPump, comment_text
from shoal.mesh.events import EventBus

from tests.mesh.api_harness import MODEL, NodeThread, make_config, slow_load

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(300)

CACHE_TOKENS = 1024
"""Room for one long answer: the filler holds it for seconds, longer than the 1 s before a queue report."""
LONG = "Write a very long story about a lighthouse keeper and the sea, in many chapters."


async def test_the_pump_forwards_reports_ticks_while_waiting_and_the_models_compile_progress() -> None:
    bus = EventBus()
    bus.bind_loop(asyncio.get_running_loop())
    written: list[dict[str, Any]] = []

    async def write(report: dict[str, Any]) -> None:
        written.append(report)

    feed = ProgressFeed(asyncio.get_running_loop())
    pump = ProgressPump(feed, write, model="m", bus=bus, queue_depth=lambda: 3)
    pump.start()
    try:
        feed.push({"message": "waiting for peer p to load layers 10:20", "waiting": "peer_load"})
        await asyncio.sleep(0.05)
        bus.publish("compile.progress", model="other", span="0:3", fraction=0.5, message="")
        bus.publish("compile.progress", model="m", span="0:3", fraction=0.25, message="kernels")
        await asyncio.sleep(1.3)  # nothing more said: a tick says the request still waits (queued here)
        waits = [r.get("waiting") for r in written]
        assert waits[0] == "peer_load"
        compiled = [r for r in written if r.get("waiting") == "local_load"]
        assert [(r["layers"], r["fraction"]) for r in compiled] == [("0:3", 0.25)]
        assert "queue" in waits and next(r for r in written if r["waiting"] == "queue")["queued"] == 3
        pump.first_token()
        count = len(written)
        await asyncio.sleep(1.3)
        assert len(written) == count, "no ticks once tokens flow"
        feed.push({"message": "peer p lost; resumed", "waiting": "recovery"})  # a re-plan mid-stream
        await asyncio.sleep(0.05)
        assert written[-1]["waiting"] == "recovery"
    finally:
        await pump.stop()
    line = comment_text(written[0])
    assert line.startswith(PREFIX) and "\n" not in line
    assert orjson.loads(line[len(PREFIX):])["waiting"] == "peer_load"


@pytest.fixture(scope="module")
def node() -> Iterator[NodeThread]:
    data_dir = Path(tempfile.mkdtemp(prefix="shoal-progress-test-"))
    models = {"cache_tokens": CACHE_TOKENS, "queue_size": 4}
    node = NodeThread(make_config(data_dir, models=models, split={"speed_probe": False})).start()
    yield node
    node.stop()


async def test_a_queued_stream_says_so_and_the_openai_client_ignores_it(node: NodeThread) -> None:
    served = node.node.models.served(MODEL)
    assert served is not None
    prompt = served.tokenizer.encode_chat([{"role": "user", "content": LONG}])
    fill = {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "stream": True,
            "max_tokens": served.engine.admission.capacity - len(prompt), "stop": ["zzzz"],
            "temperature": 1.0, "seed": 7}  # reserves the whole cache, and rambles for seconds
    small = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 3,
             "temperature": 0, "stream": True}
    client = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    async with aiohttp.ClientSession() as session:
        running = await session.post(node.url + "/v1/chat/completions", json=fill)
        assert running.status == 200
        async for raw in running.content:  # its first token: it was admitted and holds the cache (the role
            # chunk before it can come before the engine has it: the small request could then overtake it)
            if raw.startswith(b"data:") and b'"content":""' not in raw.replace(b" ", b""):
                break
        waiter = await session.post(node.url + "/v1/chat/completions", json=small)
        assert waiter.status == 200  # opened for the first report, before any token
        comments: list[dict[str, Any]] = []
        seen: list[str] = []
        async for raw in waiter.content:
            line = raw.decode().strip()
            seen.append(line[:120])
            if line.startswith(": " + PREFIX):
                comments.append(orjson.loads(line[2 + len(PREFIX):]))
            if line.startswith("data:") and '"content":""' not in line.replace(" ", ""):
                break  # a token (the role chunk that opens the stream carries no text)
            if len(comments) >= 2:
                break
        assert comments, f"the queued stream said nothing: {seen[:3]}"
        assert comments[0]["waiting"] == "queue" and comments[0]["queued"] >= 1, comments
        assert "KV cache" in comments[0]["message"]
        print(f"queued stream's first report: {comments[0]}")
        official = asyncio.create_task(client.chat.completions.create(**small))
        await asyncio.sleep(1.5)  # it waits too, and is sent comments meanwhile
        running.close()  # the filler leaves: the cache frees and both waiters run
        text = ""
        async for chunk in await official:
            for choice in chunk.choices:
                text += choice.delta.content or ""
        assert text.strip()
        rest = (await waiter.read()).decode()
        assert "data: [DONE]" in rest
        waiter.close()


def test_shoal_chat_shows_reports_on_one_stderr_line_until_text(capsys: pytest.CaptureFixture) -> None:
    from shoal.mesh.commands.chat import PROGRESS_COMMENT, _StatusLine

    line = b': shoal progress {"message": "waiting for peer abc to load layers 10:20 (2 s)"}\n'
    assert line.startswith(PROGRESS_COMMENT)
    status = _StatusLine()
    status.show(line[len(PROGRESS_COMMENT):])
    status.show(b'{"message": "resumed"}')
    status.show(b"{not json")  # ignored
    status.clear()
    err = capsys.readouterr().err
    assert err.startswith("\rwaiting for peer abc to load layers 10:20 (2 s)")
    assert "\rresumed" in err and err.endswith("\r") and "\n" not in err


async def test_a_stream_waiting_for_its_model_says_so_and_errors_come_as_frames(tmp_path: Path) -> None:
    """A node that loads its model on first use: two streamed requests wait for the load; both streams open
    with `model_load` reports; the good one streams its answer, the one asking for more tokens than the
    context (found only once the model is loaded) gets an error frame naming `max_tokens`, then `[DONE]`."""
    node = NodeThread(make_config(tmp_path, models={"preload": False}), load_fn=slow_load(2.5)).start()
    try:
        good = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 3,
                "temperature": 0, "stream": True}
        bad = {**good, "max_tokens": 1 << 19}

        async def read(session: aiohttp.ClientSession, body: dict) -> tuple[int, list[str]]:
            async with session.post(node.url + "/v1/chat/completions", json=body) as r:
                return r.status, [line.decode().strip() async for line in r.content if line.strip()]

        async with aiohttp.ClientSession() as session:
            (ok_status, ok_lines), (bad_status, bad_lines) = await asyncio.gather(read(session, good),
                                                                                  read(session, bad))
    finally:
        node.stop()
    for status, lines in ((ok_status, ok_lines), (bad_status, bad_lines)):
        assert status == 200
        reports = [orjson.loads(line[2 + len(PREFIX):]) for line in lines if line.startswith(": " + PREFIX)]
        assert reports and reports[0]["waiting"] == "model_load" and MODEL in reports[0]["message"], lines[:3]
        assert lines[-1] == "data: [DONE]"
    print(f"model load reports: {len([x for x in ok_lines if x.startswith(':')])}, first: {ok_lines[0]}")
    assert any('"content":"' in line and '"content":""' not in line for line in ok_lines)
    error = orjson.loads(bad_lines[-2][len("data: "):])["error"]
    assert error["param"] == "max_tokens" and error["type"] == "invalid_request_error", error
