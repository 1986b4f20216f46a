"""Ollama's `/api/*` dialect through the official `ollama` Python client against a real node: chat and
generate (streamed NDJSON and whole), tags, show, ps, version, options, and coded 400s naming the field."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema
import pytest

from tests.mesh.api_harness import MODEL, NodeThread

ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.timeout(300)
QUESTION = "Name the capital of France in one sentence."


@pytest.fixture
def client(node: NodeThread) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=node.url)


async def test_chat_whole_and_streamed_agree(client: ollama.AsyncClient) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    options = {"temperature": 0, "num_predict": 8, "num_ctx": 2048}
    whole = await client.chat(model=MODEL, messages=messages, options=options, stream=False)
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.message.role == "assistant" and whole.message.content
    assert 0 < whole.eval_count <= 8 and whole.prompt_eval_count > 5
    assert whole.total_duration > 0
    parts = [part async for part in await client.chat(model=MODEL + ":latest", messages=messages,
                                                       options=options, stream=True)]
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


async def test_generate_with_system_raw_and_context(client: ollama.AsyncClient) -> None:
    answer = await client.generate(model=MODEL, prompt=QUESTION, system="Be brief.",
                                   options={"temperature": 0, "num_predict": 6}, stream=False)
    assert answer.done and answer.response and answer.eval_count <= 6
    assert answer.context and len(answer.context) == answer.prompt_eval_count + answer.eval_count
    raw = [p async for p in await client.generate(model=MODEL, prompt="The capital of France is", raw=True,
                                                  options={"temperature": 0, "num_predict": 4}, stream=True)]
    assert raw[-1].done and raw[-1].eval_count == 4
    assert "".join(p.response for p in raw)
    warm = await client.generate(model=MODEL, prompt="")
    assert warm.done and warm.done_reason == "load" and warm.response == ""


async def test_seed_and_penalties_repeat(client: ollama.AsyncClient) -> None:
    options = {"temperature": 0.8, "seed": 11, "num_predict": 8, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
               "repeat_penalty": 1.1, "presence_penalty": 0.2, "frequency_penalty": 0.1, "stop": ["\n\n"]}
    first = await client.generate(model=MODEL, prompt=QUESTION, options=options)
    second = await client.generate(model=MODEL, prompt=QUESTION, options=options)
    assert first.response == second.response


async def test_tags_show_ps_version(client: ollama.AsyncClient, node: NodeThread) -> None:
    listed = await client.list()
    names = [m.model for m in listed.models]
    assert MODEL + ":latest" in names
    assert all(m.size and m.size > 0 for m in listed.models if m.model == MODEL + ":latest")
    shown = await client.show(MODEL)
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.block_count"] == 30 and "completion" in shown.capabilities
    running = await client.ps()
    assert MODEL + ":latest" in [m.model for m in running.models]
    async with aiohttp.ClientSession() as session, session.get(node.url + "/api/version") as r:
        assert r.status == 200 and (await r.json())["version"].count(".") == 2


X = [{"role": "user", "content": "x"}]
async def test_format_json_schema_constrains_the_answer(client: ollama.AsyncClient) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20},
                                               "country": {"enum": ["France", "Spain"]}},
              "required": ["capital", "country"], "additionalProperties": False}
    answer = await client.chat(model=MODEL, messages=[{"role": "user", "content": QUESTION}], format=schema,
                               options={"temperature": 0, "num_predict": 60}, stream=False)
    assert answer.done_reason == "stop"
    jsonschema.validate(json.loads(answer.message.content), schema)
    loose = await client.generate(model=MODEL, prompt=QUESTION, format="json",
                                  options={"temperature": 0, "num_predict": 60})
    assert isinstance(json.loads(loose.response), dict)


BAD = [
    ("/api/chat", {"messages": X}, "model"),
    ("/api/chat", {"model": MODEL, "messages": "x"}, "messages"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
     "messages[0].images"),
    ("/api/chat", {"model": MODEL, "messages": X, "format": "yaml"}, "format"),
    ("/api/chat", {"model": MODEL, "messages": X, "format": {"type": "object", "properties": 5}}, "format"),
    ("/api/chat", {"model": MODEL, "messages": X, "options": {"mirostat": 2}},
     "options.mirostat"),
    ("/api/chat", {"model": MODEL, "messages": X, "options": {"warp": 9}},
     "options.warp"),
    ("/api/chat", {"model": MODEL, "messages": X,
                   "options": {"num_predict": "8"}}, "options.num_predict"),
    ("/api/chat", {"model": MODEL, "messages": X,
                   "options": {"temperature": 9}}, "options.temperature"),
    ("/api/generate", {"model": MODEL, "prompt": 5}, "prompt"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "raw": True, "system": "s"}, "system"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "context": [1, 2]}, "context"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "stream": "no"}, "stream"),
    ("/api/show", {"model": "nope"}, "model"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD)
async def test_bad_requests_are_400_naming_the_field(node: NodeThread, path: str, body: dict[str, Any],
                                                     param: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(node.url + path, json=body) as r:
        data = await r.json()
    assert r.status == 400, data
    assert data["error"]["param"] == param and data["error"]["code"]


async def test_client_sees_errors_as_response_error(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        await client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        await client.chat(model=MODEL, messages=X, options={"typical_p": 0.5})
    assert err.value.status_code == 400 and "typical_p" in str(err.value)


async def test_pull_goes_through_the_ipfs_path(client: ollama.AsyncClient) -> None:
    """The embedded model is in the node's block store: the pull completes from it, with progress."""
    parts = [p async for p in await client.pull(MODEL, stream=True)]
    assert parts[0].status == "pulling manifest" and parts[-1].status == "success"
    progress = [p for p in parts if p.digest]
    assert all(p.completed <= p.total for p in progress)
    assert (await client.pull(MODEL + ":latest")).status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        await client.pull("no-such-model")
    assert err.value.status_code == 404


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


async def test_tools_give_text_or_a_valid_call_and_continue(client: ollama.AsyncClient) -> None:
    messages = [{"role": "system", "content": "Always answer by calling a function."},
                {"role": "user", "content": "What is the weather in Paris?"}]
    options = {"temperature": 0, "num_predict": 60}
    whole = await client.chat(model=MODEL, messages=messages, tools=[WEATHER_TOOL], options=options)
    parts = [p async for p in await client.chat(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                options=options, stream=True)]
    calls = parts[-1].message.tool_calls
    if whole.message.tool_calls:
        call = whole.message.tool_calls[0].function
        assert call.name == "get_weather"
        jsonschema.validate(dict(call.arguments), WEATHER_TOOL["function"]["parameters"])
        assert calls and calls[0].function.arguments == call.arguments
    else:
        assert whole.message.content and not calls
        assert "".join(p.message.content or "" for p in parts) == whole.message.content
    follow = await client.chat(model=MODEL, options={"temperature": 0, "num_predict": 8}, messages=[
        *messages, {"role": "assistant", "content": "",
                    "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 degrees and sunny"}])
    assert follow.message.content
