"""OpenAI endpoints of a real node (real model, real HTTP): shapes, parameters, streaming framing."""

from __future__ import annotations

import asyncio
import shutil

import aiohttp
import orjson
import pytest

from tests.mesh.api_harness import MODEL, NodeThread, chat_body, read_sse

pytestmark = pytest.mark.timeout(300)


def prompt_tokens(node: NodeThread, messages: list[dict[str, str]]) -> int:
    served = node.node.models.served(MODEL)
    assert served is not None
    return len(served.tokenizer.encode_chat(messages))


async def post(node: NodeThread, path: str, body: dict) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as session, session.post(node.url + path, json=body) as response:
        return response.status, await response.json(), response.headers


async def test_models_list_has_the_embedded_model(node: NodeThread) -> None:
    async with aiohttp.ClientSession() as session, session.get(node.url + "/v1/models") as response:
        assert response.status == 200
        assert response.headers["x-shoal-route"] == "local"
        body = await response.json()
    assert body["object"] == "list"
    (model,) = [m for m in body["data"] if m["id"] == MODEL]
    assert model["object"] == "model" and model["owned_by"] == "shoal" and isinstance(model["created"], int)
    assert model["shoal"]["loaded"] is True
    assert model["shoal"]["size"] > 90_000_000
    assert model["shoal"]["pinned"] is True


async def test_chat_completion_shape_and_usage(node: NodeThread) -> None:
    body = chat_body(max_tokens=4, temperature=0)
    status, data, headers = await post(node, "/v1/chat/completions", body)
    assert status == 200, data
    assert headers["x-shoal-route"] == "local"
    assert (
        data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-") and data["model"] == MODEL
    )
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("length", "stop")
    usage = data["usage"]
    assert usage["prompt_tokens"] == prompt_tokens(node, body["messages"])
    assert 1 <= usage["completion_tokens"] <= 4
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    route = data["shoal_route"]
    assert route["kind"] == "local" and route["replans"] == 0
    assert isinstance(route["peers"], list) and isinstance(route["spans"], list)


async def test_max_completion_tokens_wins_over_max_tokens(node: NodeThread) -> None:
    body = chat_body("Count from one to twenty.", max_tokens=8, max_completion_tokens=2, temperature=0)
    status, data, _ = await post(node, "/v1/chat/completions", body)
    assert status == 200, data
    assert data["usage"]["completion_tokens"] == 2
    assert data["choices"][0]["finish_reason"] == "length"


async def test_text_completion_with_string_and_token_prompts(node: NodeThread) -> None:
    status, data, _ = await post(
        node,
        "/v1/completions",
        {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0},
    )
    assert status == 200, data
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    text = data["choices"][0]["text"]
    assert isinstance(text, str) and data["usage"]["completion_tokens"] == 3
    served = node.node.models.served(MODEL)
    assert served is not None
    ids = served.tokenizer.encode("The capital of France is")
    assert data["usage"]["prompt_tokens"] == len(ids)
    status, by_ids, _ = await post(
        node, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 3, "temperature": 0}
    )
    assert status == 200, by_ids
    assert by_ids["choices"][0]["text"] == text  # same prompt, greedy: same answer


async def test_streaming_chat_chunks_follow_openai(node: NodeThread) -> None:
    body = chat_body(max_tokens=5, temperature=0)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            node.url + "/v1/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["x-shoal-route"] == "local"
        frames = await read_sse(r)
    assert frames[-1] == "[DONE]"
    chunks = frames[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    final = chunks[-2]
    assert final["choices"][0]["finish_reason"] in ("length", "stop")
    assert final["choices"][0]["delta"] == {}
    assert final["shoal_route"]["kind"] == "local"
    content = chunks[1:-2]
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in content)
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert usage_chunk["usage"]["completion_tokens"] == 5 or final["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["usage"]["prompt_tokens"] == prompt_tokens(node, body["messages"])
    # The same request without streaming gives the same greedy text.
    status, data, _ = await post(node, "/v1/chat/completions", body)
    assert status == 200 and data["choices"][0]["message"]["content"] == streamed


async def test_streaming_completion_without_usage(node: NodeThread) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            node.url + "/v1/completions",
            json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "stream": True},
        ) as r,
    ):
        assert r.status == 200
        frames = await read_sse(r)
    assert frames[-1] == "[DONE]"
    chunks = frames[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_seeded_sampling_is_reproducible(node: NodeThread) -> None:
    body = chat_body(
        "Tell me a word.",
        max_tokens=6,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    results = []
    for _ in range(2):
        status, data, _ = await post(node, "/v1/chat/completions", body)
        assert status == 200, data
        results.append(data["choices"][0]["message"]["content"])
    assert results[0] == results[1]


async def test_stop_sequence_ends_the_answer(node: NodeThread) -> None:
    body = chat_body("Write the days of the week.", max_tokens=8, temperature=0)
    status, data, _ = await post(node, "/v1/chat/completions", body)
    assert status == 200
    text = data["choices"][0]["message"]["content"]
    assert len(text) >= 3
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    prefix = text[: text.index(stop)]
    for stop_param in (stop, [stop, "\u2603never"]):
        status, stopped, _ = await post(node, "/v1/chat/completions", {**body, "stop": stop_param})
        assert status == 200, stopped
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["choices"][0]["message"]["content"] == prefix


async def test_harmless_unknown_parameters_are_accepted(node: NodeThread) -> None:
    body = chat_body(
        max_tokens=1,
        user="alice",
        metadata={"a": "b"},
        store=False,
        n=1,
        logprobs=False,
        response_format={"type": "text"},
        tools=[],
        some_future_knob=3,
        top_k=40,
        repetition_penalty=1.1,
    )
    status, data, _ = await post(node, "/v1/chat/completions", body)
    assert status == 200, data
    assert data["usage"]["completion_tokens"] == 1


async def test_content_parts_and_developer_role(node: NodeThread) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 1,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
        ],
    }
    status, data, _ = await post(node, "/v1/chat/completions", body)
    assert status == 200, data
    expected = prompt_tokens(
        node, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    )
    assert data["usage"]["prompt_tokens"] == expected


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_sees_sse_framing(node: NodeThread) -> None:
    body = orjson.dumps(chat_body(max_tokens=3, stream=True))
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-N",
        "-H",
        "Content-Type: application/json",
        "-d",
        body.decode(),
        node.url + "/v1/chat/completions",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err
    events = out.split(b"\n\n")
    assert events[-1] == b""  # every event ends with a blank line
    frames = [e for e in events if e and not e.startswith(b": shoal progress ")]  # a slow start is reported
    assert all(f.startswith(b"data: ") and b"\n" not in f for f in frames)
    assert frames[-1] == b"data: [DONE]"
    first = orjson.loads(frames[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"
