"""`/v1/responses` through the official `openai` client against a real node: a text answer, the streamed
typed events (and the client's own accumulation of them), `text.format` json_schema, and 400s."""

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
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
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
