"""`/v1/responses` through the official `openai` client against a real node: a text answer, the streamed
typed events (and the client's own accumulation of them), `text.format` json_schema, function tools (a call
whole and streamed, a conversation carrying a call and its output), `previous_response_id` (and `store:
false`), and 400s."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.mesh.api_harness import MODEL, NodeThread

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(300)
QUESTION = "Name the capital of France in one sentence."


@pytest.fixture
def client(node: NodeThread) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)


async def test_text_answer_whole_and_streamed(client: openai.AsyncOpenAI) -> None:
    params = {"model": MODEL, "input": QUESTION, "instructions": "Be brief.", "max_output_tokens": 8,
              "temperature": 0}
    whole = await client.responses.create(**params)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage.output_tokens <= 8 and whole.usage.input_tokens > 5
    if whole.status == "incomplete":
        assert whole.incomplete_details.reason == "max_output_tokens"
    kinds = []
    async with client.responses.stream(**params) as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_response()
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert kinds[-1] == "response.completed" and final.status == whole.status
    assert final.output_text == whole.output_text
    messages = await client.responses.create(model=MODEL, max_output_tokens=8, temperature=0, input=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}])
    assert messages.output_text == whole.output_text


async def test_text_format_json_schema(client: openai.AsyncOpenAI) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20},
                                               "country": {"enum": ["France", "Spain"]}},
              "required": ["capital", "country"], "additionalProperties": False}
    answer = await client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=60, temperature=0,
                                           text={"format": {"type": "json_schema", "name": "city",
                                                            "schema": schema, "strict": True}})
    assert answer.status == "completed"
    jsonschema.validate(json.loads(answer.output_text), schema)


BAD = [
    ({"input": None}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
     "tool_choice.name"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"store": "yes"}, "store"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
]


@pytest.mark.parametrize(("change", "param"), BAD)
async def test_bad_requests_are_400(client: openai.AsyncOpenAI, change: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "input": QUESTION, **change}
    with pytest.raises(openai.BadRequestError) as err:
        await client.post("/responses", body={k: v for k, v in body.items() if v is not None},
                          cast_to=object)
    assert err.value.body["param"] == param


WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
ASK = "What is the weather in Paris?"


async def test_function_call_whole_and_streamed(client: openai.AsyncOpenAI) -> None:
    params = {"model": MODEL, "input": ASK, "max_output_tokens": 60, "temperature": 0, "tools": [WEATHER],
              "tool_choice": "required"}
    whole = await client.responses.create(**params)
    assert whole.status == "completed" and len(whole.output) == 1, whole
    call = whole.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert whole.tools[0].name == "get_weather" and whole.output_text == ""
    events = [e async for e in await client.responses.create(**params, stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"], kinds
    assert events[2].item.type == "function_call" and events[2].item.name == "get_weather"
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert len(deltas) >= 2 and "".join(deltas) == done.arguments
    assert json.loads(done.arguments) == json.loads(call.arguments)
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    final = events[-1].response
    assert final.output[0].call_id == events[2].item.call_id and final.output[0].arguments == done.arguments
    async with client.responses.stream(**params) as stream:  # the client's own accumulation of the events
        helped = await stream.get_final_response()
    assert json.loads(helped.output[0].arguments) == json.loads(call.arguments)
    named = await client.responses.create(**{**params, "tool_choice": {"type": "function",
                                                                       "name": "get_weather"}})
    assert named.output[0].name == "get_weather"


async def test_a_call_and_its_output_continue_the_conversation(client: openai.AsyncOpenAI) -> None:
    items = [{"role": "user", "content": ASK},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Paris", "unit": "celsius"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees and sunny"}]
    answer = await client.responses.create(model=MODEL, input=items, tools=[WEATHER], tool_choice="none",
                                           max_output_tokens=12, temperature=0)
    assert answer.output[0].type == "message" and answer.output_text
    # the same conversation through chat completions gives the same text: one prompt, one path
    chat = await client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, tools=[
        {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}],
        tool_choice="none", messages=[
            {"role": "user", "content": ASK},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}])
    assert chat.choices[0].message.content == answer.output_text


async def test_previous_response_id_continues_and_store_false_is_not_kept(client: openai.AsyncOpenAI) -> None:
    first = await client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=6,
                                          temperature=0, instructions="Be brief.")
    assert (await client.responses.retrieve(first.id)).output_text == first.output_text
    follow = await client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=8,
                                           temperature=0, previous_response_id=first.id)
    assert follow.previous_response_id == first.id
    spelled = await client.responses.create(model=MODEL, max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert follow.output_text == spelled.output_text  # instructions are not carried over
    streamed = [e async for e in await client.responses.create(
        model=MODEL, input="What is my name?", max_output_tokens=8, temperature=0, stream=True,
        previous_response_id=first.id)]
    assert streamed[-1].response.output_text == follow.output_text
    chained = await client.responses.create(model=MODEL, input="Thanks.", max_output_tokens=4,
                                            temperature=0, previous_response_id=streamed[-1].response.id)
    assert chained.status in ("completed", "incomplete")
    unkept = await client.responses.create(model=MODEL, input="Hi.", max_output_tokens=2, temperature=0,
                                           store=False)
    for missing in (unkept.id, "resp_nope"):
        with pytest.raises(openai.BadRequestError) as err:
            await client.responses.create(model=MODEL, input="Again.", previous_response_id=missing)
        assert err.value.body["code"] == "previous_response_not_found"
        assert err.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unkept.id)


def test_response_store_is_bounded_by_count_and_size() -> None:
    from shoal.mesh.api.responses_store import ResponseStore

    store = ResponseStore(max_responses=3, max_bytes=2000)
    for i in range(5):
        assert store.put(f"resp_{i}", {"i": i}, [{"role": "user", "content": "x" * 100}])
    assert len(store) == 3 and store.get("resp_0") is None and store.get("resp_4") is not None
    assert not store.put("huge", {}, [{"role": "user", "content": "x" * 3000}]) and store.get("huge") is None
    assert store.put("big", {}, [{"role": "user", "content": "x" * 1500}])
    assert store.bytes <= 2000 and store.get("big") is not None and len(store) <= 3
    assert store.put("bigger", {}, [{"role": "user", "content": "x" * 1500}])  # the first big one goes
    assert store.get("big") is None and store.bytes <= 2000


async def test_the_agent_loop_by_previous_response_id(client: openai.AsyncOpenAI) -> None:
    """The loop coding agents run: the model calls a tool; the client answers with the call's output, naming
    the response instead of resending the conversation; same answer as sending it all."""
    tools = [WEATHER]
    first = await client.responses.create(model=MODEL, input=ASK, tools=tools, tool_choice="required",
                                          max_output_tokens=60, temperature=0)
    call = first.output[0]
    assert call.type == "function_call"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}
    after = {"tools": tools, "tool_choice": "none", "max_output_tokens": 10, "temperature": 0}
    follow = await client.responses.create(model=MODEL, previous_response_id=first.id, input=[result],
                                           **after)
    spelled = await client.responses.create(model=MODEL, **after, input=[
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        result])
    assert follow.output[0].type == "message" and follow.output_text == spelled.output_text
