"""The official `openai` Python client works against a node unchanged: chat, streaming, completions, models,
and errors surface as the client's own exception types."""

from __future__ import annotations

import pytest

from tests.mesh.api_harness import MODEL, NodeThread

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def client(node: NodeThread) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)


async def test_models_and_chat(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert MODEL in [m.id for m in models.data]
    answer = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=4,
        temperature=0,
    )
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens <= 4
    assert answer.choices[0].finish_reason in ("stop", "length")


async def test_streaming_chat_and_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text and finish in ("stop", "length")
    assert usage is not None and 1 <= usage.completion_tokens <= 4


async def test_completions(client: openai.AsyncOpenAI) -> None:
    answer = await client.completions.create(model=MODEL, prompt="One, two,", max_tokens=2, temperature=0)
    assert answer.choices[0].text and answer.usage is not None and answer.usage.completion_tokens == 2


async def test_errors_map_to_client_exceptions(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3)
    assert bad.value.param == "n"
