"""Anthropic's `/v1/messages` through the official `anthropic` client against a real node: a whole message,
the streamed events, stop reasons, and coded 400s naming the Anthropic field."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema
import pytest

from tests.mesh.api_harness import MODEL, NodeThread

anthropic = pytest.importorskip("anthropic")

pytestmark = pytest.mark.timeout(300)
QUESTION = [{"role": "user", "content": "Name the capital of France in one sentence."}]
GREEDY = {"temperature": 0}
"""Sampling fields go in `extra_body`: recent `anthropic` clients dropped them from `create()`."""


@pytest.fixture
def client(node: NodeThread) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=node.url, api_key="unused", max_retries=0)


async def test_message_and_stream_agree(client: anthropic.AsyncAnthropic) -> None:
    whole = await client.messages.create(model=MODEL, max_tokens=8, messages=QUESTION, system="Be brief.",
                                         extra_body=GREEDY)
    assert whole.type == "message" and whole.role == "assistant" and whole.id.startswith("msg_")
    assert whole.content[0].type == "text" and whole.content[0].text
    assert whole.stop_reason in ("end_turn", "max_tokens")
    assert 0 < whole.usage.output_tokens <= 8 and whole.usage.input_tokens > 5
    async with client.messages.stream(model=MODEL, max_tokens=8, messages=QUESTION, system="Be brief.",
                                      extra_body=GREEDY) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


async def test_stop_reasons(client: anthropic.AsyncAnthropic) -> None:
    long = await client.messages.create(model=MODEL, max_tokens=3, messages=QUESTION, extra_body=GREEDY)
    assert long.stop_reason == "max_tokens" and long.usage.output_tokens == 3
    free = await client.messages.create(model=MODEL, max_tokens=40, messages=QUESTION, extra_body=GREEDY)
    text = free.content[0].text
    assert len(text) > 4
    cut = text[2:4]
    stopped = await client.messages.create(model=MODEL, max_tokens=40, messages=QUESTION, extra_body=GREEDY,
                                           stop_sequences=[cut, "\u2603never"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == cut
    assert stopped.content[0].text == text[: text.index(cut)]


async def test_output_config_format_constrains_the_answer(client: anthropic.AsyncAnthropic) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20},
                                               "country": {"enum": ["France", "Spain"]}},
              "required": ["capital", "country"], "additionalProperties": False}
    answer = await client.messages.create(model=MODEL, max_tokens=60, messages=QUESTION, extra_body=GREEDY,
                                          output_config={"format": {"type": "json_schema", "schema": schema}})
    assert answer.stop_reason == "end_turn"
    jsonschema.validate(json.loads(answer.content[0].text), schema)


WEATHER = {"name": "get_weather", "description": "The current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                            "required": ["city"], "additionalProperties": False}}


async def test_tool_use_whole_streamed_and_continued(client: anthropic.AsyncAnthropic) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = {"model": MODEL, "max_tokens": 60, "messages": ask, "tools": [WEATHER],
              "tool_choice": {"type": "any"}, "extra_body": GREEDY}
    whole = await client.messages.create(**params)
    assert whole.stop_reason == "tool_use"
    block = whole.content[0]
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, WEATHER["input_schema"])
    async with client.messages.stream(**params) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == block.input
    follow = await client.messages.create(
        model=MODEL, max_tokens=10, tools=[WEATHER], extra_body=GREEDY, messages=[
            *ask, {"role": "assistant", "content": [{"type": "tool_use", "id": block.id, "name": block.name,
                                                     "input": block.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                          "content": "18 degrees and sunny"}]}],
        tool_choice={"type": "none"})
    assert follow.content[0].type == "text" and follow.content[0].text


BAD = [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": "The"}]}, "messages[1].role"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}],
      "tool_choice": {"type": "tool", "name": "g"}}, "tool_choice.name"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"stop_sequences": "x"}, "stop_sequences"),
    ({"temperature": "warm"}, "temperature"),
    ({"system": 5}, "system"),
    ({"output_config": {"format": {"type": "yaml"}}}, "output_config.format"),
    ({"output_config": {"format": {"type": "json_schema", "schema": 5}}}, "output_config.format.schema"),
]


@pytest.mark.parametrize(("change", "param"), BAD)
async def test_bad_requests_are_400_naming_the_field(node: NodeThread, change: dict[str, Any],
                                                     param: str) -> None:
    body = {"model": MODEL, "max_tokens": 4, "messages": QUESTION, **change}
    body = {k: v for k, v in body.items() if v is not None}
    async with aiohttp.ClientSession() as session, session.post(node.url + "/v1/messages", json=body) as r:
        data = await r.json()
    assert r.status == 400, data
    assert data["error"]["param"] == param and data["error"]["code"]


async def test_client_raises_its_own_errors(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="no-such-model", max_tokens=4, messages=QUESTION)
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model=MODEL, max_tokens=4, messages=QUESTION, extra_body={"top_k": -1})
