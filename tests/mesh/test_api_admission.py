"""KV admission through the API on a node with a small KV cache: long chats without `max_tokens` queue and
all finish; a full queue answers 429 with `Retry-After` and a coded body (seen through the openai client)."""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.mesh.api_harness import MODEL, NodeThread, make_config, read_sse

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(600)

CACHE_TOKENS = 192
DEFAULT_MAX_TOKENS = 32
QUEUE_SIZE = 8
LONG = "Write a very long story about a lighthouse keeper and the sea."


@pytest.fixture(scope="module")
def node() -> Iterator[NodeThread]:
    data_dir = Path(tempfile.mkdtemp(prefix="shoal-admission-test-"))
    models = {"cache_tokens": CACHE_TOKENS, "default_max_tokens": DEFAULT_MAX_TOKENS,
              "queue_size": QUEUE_SIZE}
    # no speed probe: its own short run would take a place in the queue these tests count
    node = NodeThread(make_config(data_dir, models=models, split={"speed_probe": False})).start()
    yield node
    node.stop()


async def metrics(node: NodeThread) -> dict[str, float]:
    """The node's `shoal_*` samples, summed over their labels (histogram buckets left out)."""
    async with aiohttp.ClientSession() as session, session.get(node.url + "/metrics") as r:
        text = await r.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(shoal_[a-z_]+)(?:\{[^}]*\})?\s+([0-9.e+-]+)$", line)
        if match and not match.group(1).endswith("_bucket"):
            samples[match.group(1)] = samples.get(match.group(1), 0.0) + float(match.group(2))
    return samples


async def wait_until(condition: object, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_long_chats_without_max_tokens_queue_and_all_finish(node: NodeThread) -> None:
    async def one(session: aiohttp.ClientSession, i: int) -> list:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"{LONG} Chapter {i}."}],
                "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
        async with session.post(node.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            return await read_sse(r)

    served = node.node.models.served(MODEL) if node.node.models.loaded_names() else None
    assert served is not None and served.engine.admission.capacity == CACHE_TOKENS
    timeout = aiohttp.ClientTimeout(total=500)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(one(session, i) for i in range(6)))
    for frames in results:
        assert frames[-1] == "[DONE]" and "error" not in frames[-2]
        usage, final = frames[-2]["usage"], frames[-3]["choices"][0]
        text = "".join(f["choices"][0]["delta"].get("content", "") for f in frames[1:-3])
        assert text.strip()
        if final["finish_reason"] == "length":
            assert usage["completion_tokens"] == DEFAULT_MAX_TOKENS  # the documented default cap
        else:
            assert final["finish_reason"] == "stop" and usage["completion_tokens"] <= DEFAULT_MAX_TOKENS
    # Only a few such chats fit the cache at once (whole 16-token pages each): the others waited.
    prompt = served.tokenizer.encode_chat([{"role": "user", "content": f"{LONG} Chapter 0."}])
    at_once = CACHE_TOKENS // (-(-(len(prompt) + DEFAULT_MAX_TOKENS) // 16) * 16)
    assert 1 <= at_once < 6
    assert served.engine.stats.admitted >= 6 and served.engine.stats.max_decode_batch <= at_once
    samples = await metrics(node)
    assert samples["shoal_admission_wait_seconds_count"] >= 6
    assert samples["shoal_admission_wait_seconds_sum"] > 0
    assert samples["shoal_kv_capacity_tokens"] == CACHE_TOKENS and samples["shoal_kv_reserved_tokens"] == 0
    assert samples["shoal_engine_waiting"] == 0


async def test_a_full_queue_is_429_with_retry_after(node: NodeThread) -> None:
    served = node.node.models.served(MODEL)
    assert served is not None
    prompt = served.tokenizer.encode_chat([{"role": "user", "content": LONG}])
    fill = {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "stream": True,
            "max_tokens": CACHE_TOKENS - len(prompt), "stop": ["zzzz"]}  # reserves the whole cache
    small = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}

    async def waiting() -> bool:
        return (await metrics(node)).get("shoal_engine_waiting", 0) == QUEUE_SIZE

    client = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    async with aiohttp.ClientSession() as session:
        running = await session.post(node.url + "/v1/chat/completions", json=fill)
        assert running.status == 200  # streaming: its first token exists, so it holds the cache
        waiters = [asyncio.create_task(session.post(node.url + "/v1/chat/completions", json=small))
                   for _ in range(QUEUE_SIZE)]
        await wait_until(waiting)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(**small)
        error = info.value
        assert error.status_code == 429
        assert int(error.response.headers["Retry-After"]) >= 1
        assert error.body["code"] == "queue_full" and error.body["type"] == "rate_limit_error"
        assert f"the queue holds {QUEUE_SIZE}" in error.body["message"]
        running.close()  # the client leaves: the cache frees and the queue drains
        answers = await asyncio.gather(*waiters)
        assert [a.status for a in answers] == [200] * QUEUE_SIZE
        for answer in answers:
            assert (await answer.json())["choices"][0]["finish_reason"] in ("stop", "length")
    samples = await metrics(node)
    assert samples["shoal_admission_refused_total"] >= 1 and samples["shoal_engine_waiting"] == 0


def test_a_timed_out_wait_is_503_and_both_refusals_count() -> None:
    from shoal.mesh.api.busy import refused_response
    from shoal.mesh.api.metrics import NodeMetrics
    from shoal.models.admission import AdmissionTimeoutError, QueueFullError

    metrics = NodeMetrics()
    timeout = refused_response(metrics, MODEL, AdmissionTimeoutError("waited 600 s", 7))
    assert timeout.status == 503 and timeout.headers["Retry-After"] == "7"
    assert b'"code":"queue_timeout"' in timeout.body and b'"type":"server_error"' in timeout.body
    full = refused_response(metrics, MODEL, QueueFullError("full", 0))
    assert full.status == 429 and full.headers["Retry-After"] == "1"  # never less than a second
    assert b'"code":"queue_full"' in full.body and b'"type":"rate_limit_error"' in full.body
    refused = metrics.admission_refused
    assert refused.labels(MODEL, "timeout")._value.get() == 1
    assert refused.labels(MODEL, "queue_full")._value.get() == 1
