"""Many clients at once, and clients that leave: usage stays right and the engine gets its memory back."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.mesh.api_harness import NodeThread, chat_body, read_sse

pytestmark = pytest.mark.timeout(300)


async def wait_for_no_sequences(node: NodeThread) -> None:
    deadline = time.monotonic() + 60.0
    while node.active_sequences() != 0 or node.kv_sequences() not in (0, None):
        assert time.monotonic() < deadline, f"{node.active_sequences()} sequences still held"
        await asyncio.sleep(0.05)


async def test_sixteen_concurrent_streams_complete_with_correct_usage(node: NodeThread) -> None:
    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, dict, str]:
        body = chat_body(
            f"Say the number {i}.", max_tokens=2 + i % 4, stream=True, stream_options={"include_usage": True}
        )
        async with session.post(node.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            frames = await read_sse(r)
        assert frames[-1] == "[DONE]"
        usage = frames[-2]["usage"]
        final = frames[-3]["choices"][0]
        text = "".join(f["choices"][0]["delta"].get("content", "") for f in frames[1:-3])
        return i, {**usage, "finish": final["finish_reason"]}, text

    timeout = aiohttp.ClientTimeout(total=240)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(one(session, i) for i in range(16)))
    served = node.node.models.served("smollm2-135m-instruct")
    assert served is not None
    for i, usage, _text in results:
        messages = [{"role": "user", "content": f"Say the number {i}."}]
        assert usage["prompt_tokens"] == len(served.tokenizer.encode_chat(messages))
        if usage["finish"] == "length":
            assert usage["completion_tokens"] == 2 + i % 4
        else:
            assert usage["finish"] == "stop" and 1 <= usage["completion_tokens"] <= 2 + i % 4
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    await wait_for_no_sequences(node)


async def test_disconnect_mid_stream_cancels_and_frees_the_sequence(node: NodeThread) -> None:
    await wait_for_no_sequences(node)
    body = chat_body("Write a very long story about the sea.", max_tokens=400, stream=True)
    async with aiohttp.ClientSession() as session:
        response = await session.post(node.url + "/v1/chat/completions", json=body)
        assert response.status == 200
        seen = 0
        async for line in response.content:
            if line.startswith(b"data: "):
                seen += 1
                if seen == 3:  # role chunk + two tokens
                    break
        assert node.active_sequences() == 1
        response.close()  # drop the connection mid-stream
    await wait_for_no_sequences(node)
    async with aiohttp.ClientSession() as session, session.get(node.url + "/v1/mesh/requests") as r:
        records = (await r.json())["requests"]
    assert records[-1]["status"] == "cancelled"
    assert records[-1]["tokens"] < 400


async def test_disconnect_during_a_non_streaming_request_frees_the_sequence(node: NodeThread) -> None:
    await wait_for_no_sequences(node)
    body = chat_body("Write a very long story about the mountains.", max_tokens=400)
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(session.post(node.url + "/v1/chat/completions", json=body))
        deadline = time.monotonic() + 60
        while node.active_sequences() == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await wait_for_no_sequences(node)
