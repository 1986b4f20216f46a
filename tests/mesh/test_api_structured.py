"""Structured output and tool calls through the official `openai` client against a real node:
`response_format` json_schema (strict, nested objects, arrays, enums) and json_object, `tools` with
`tool_choice` required / named / auto, streamed tool-call deltas, and a conversation that carries a call and
its result."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from shoal.mesh.split.router import logits_top_k
from shoal.models.grammar import Constraint
from shoal.models.sampling import SamplingParams

from tests.mesh.api_harness import MODEL, NodeThread

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(300)
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"enum": ["France", "Germany", "Spain"]},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 2},
        "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                     "required": ["lat", "lon"], "additionalProperties": False},
    },
    "required": ["city", "country", "facts", "location"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(node: NodeThread) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)


async def test_json_schema_strict_output_is_valid(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=200,
        temperature=0, response_format={"type": "json_schema",
                                        "json_schema": {"name": "city", "strict": True, "schema": CITY}},
    )
    assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
    jsonschema.validate(json.loads(answer.choices[0].message.content), CITY)
    loose = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=200,
        temperature=0, response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(loose.choices[0].message.content), dict)


async def _stream_call(client: openai.AsyncOpenAI, **params: Any) -> tuple[str, str, str | None, int]:
    name, arguments, finish, deltas = "", "", None, 0
    async for chunk in await client.chat.completions.create(**params, stream=True):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for call in choice.delta.tool_calls or []:
            deltas += 1
            name += call.function.name or "" if call.function else ""
            arguments += call.function.arguments or "" if call.function else ""
        finish = choice.finish_reason or finish
    return name, arguments, finish, deltas


async def test_required_and_named_tool_calls_whole_and_streamed(client: openai.AsyncOpenAI) -> None:
    params = {"model": MODEL, "messages": ASK, "max_tokens": 80, "temperature": 0, "tools": [WEATHER, TIME]}
    answer = await client.chat.completions.create(**params, tool_choice="required")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])
    name, arguments, finish, deltas = await _stream_call(client, **params, tool_choice="required")
    assert (name, json.loads(arguments), finish) == (call.function.name, json.loads(call.function.arguments),
                                                     "tool_calls")
    assert deltas >= 2  # the name first, then the arguments as they were generated
    named = await client.chat.completions.create(
        **params, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"
    jsonschema.validate(json.loads(named.choices[0].message.tool_calls[0].function.arguments),
                        TIME["function"]["parameters"])


async def test_auto_answers_in_text_or_a_valid_call(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                                  tools=[WEATHER])
    message = answer.choices[0].message
    if message.tool_calls:
        assert answer.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(message.tool_calls[0].function.arguments),
                            WEATHER["function"]["parameters"])
    else:
        assert message.content and not message.content.lstrip().startswith("{")


async def test_a_call_and_its_result_continue_the_conversation(client: openai.AsyncOpenAI) -> None:
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    answer = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                  temperature=0, tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                          "properties": 5}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize(("change", "param"), BAD)
async def test_bad_structured_requests_are_400(client: openai.AsyncOpenAI, change: dict[str, Any],
                                               param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **change)
    assert err.value.body["param"] == param


def test_split_stages_return_whole_rows_for_constrained_requests() -> None:
    assert logits_top_k(SamplingParams(temperature=0, constraint=Constraint("json_object")), 256) == 0
    assert logits_top_k(SamplingParams(temperature=0, logprobs=2), 256) == 0


@pytest.mark.slow
def test_model_answers_are_valid_on_generated_schemas(node: NodeThread) -> None:
    """The real model (not random logits, as tests/models/test_grammar.py uses) on 100 generated schemas:
    every finished answer validates. `-m slow`; a few minutes on two cores."""
    from hypothesis import HealthCheck, given, settings

    from tests.models.test_grammar import TOP

    client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    finished: list[bool] = []

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(schema=TOP)
    def check(schema: dict[str, Any]) -> None:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Fill in this JSON form."}], max_tokens=300,
            temperature=0.7, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "form", "schema": schema}},
        )
        choice = answer.choices[0]
        finished.append(choice.finish_reason == "stop")
        if finished[-1]:
            jsonschema.validate(json.loads(choice.message.content), schema)

    check()
    print(f"{sum(finished)} of {len(finished)} answers finished within max_tokens; all of them valid")
    assert sum(finished) >= 0.8 * len(finished)
