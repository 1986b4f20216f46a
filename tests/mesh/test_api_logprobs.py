"""Logprobs and the sampling fields through the official `openai` client against a real node: chat and
completions, streamed and not."""

from __future__ import annotations

import math

import pytest

from tests.mesh.api_harness import MODEL, NodeThread

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(300)
MESSAGES = [{"role": "user", "content": "Name the capital of France in one sentence."}]


@pytest.fixture
def client(node: NodeThread) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)


async def test_chat_logprobs_with_top_logprobs(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0.0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy picks the most likely token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert bytes(item.bytes).decode("utf-8", errors="replace") == item.token
    if choice.finish_reason == "length":
        assert "".join(i.token for i in content) == choice.message.content
    plain = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content


async def test_streamed_chat_logprobs_match_the_collected_ones(client: openai.AsyncOpenAI) -> None:
    params = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True}
    whole = await client.chat.completions.create(**params)
    stream = await client.chat.completions.create(**params, stream=True)
    streamed = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    expected = whole.choices[0].logprobs.content
    assert [i.token for i in streamed] == [i.token for i in expected]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in expected], abs=1e-4)
    assert all(i.top_logprobs == [] for i in streamed)


async def test_completion_logprobs(client: openai.AsyncOpenAI) -> None:
    answer = await client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2,
    )
    lp = answer.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == 4 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(logprob)
        assert token in top
    assert "".join(lp.tokens) == answer.choices[0].text
    chunks = [c async for c in await client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=0, stream=True,
    )]
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


async def test_sampling_fields_are_accepted_and_seed_repeats(client: openai.AsyncOpenAI) -> None:
    params = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0.9, "seed": 7,
              "presence_penalty": 0.5, "frequency_penalty": 0.3,
              "extra_body": {"min_p": 0.05, "top_k": 40, "repetition_penalty": 1.1}}
    first = await client.chat.completions.create(**params)
    second = await client.chat.completions.create(**params)
    assert first.choices[0].message.content == second.choices[0].message.content
    answer = await client.chat.completions.create(**{**params, "logprobs": True})
    assert all(math.isfinite(i.logprob) for i in answer.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert err.value.body["param"] == "n"
