"""The API's features give the same answers whether a request runs locally, offloaded to a peer or split over
two stages (greedy, and seeded sampling): logprobs and top_logprobs (whole and streamed), `stop` (and which
stop matched, as the Anthropic dialect reports it), `seed`, `response_format` json_schema, tools (chat, and
Responses whole and streamed), and the `max_tokens` length finish. A node that does not hold the model
embeds through a peer with the holder's own vectors, generates constrained output through it, and gets a
coded 400 for a schema that cannot be enforced.

Three real node processes on loopback (NumPy backend): a (origin, holds the model), b (holds it, serves
others), d (no model). Routes are forced on a with `PUT /v1/mesh/route`.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import jsonschema
import numpy as np
import pytest
from shoal.mesh.p2p.identity import Identity

from tests.mesh.mesh_nodes import wait_until
from tests.mesh.split_nodes import MODEL, SplitNode, start_nodes

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(900)

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}}
ANSWER = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12},
                                           "sure": {"type": "boolean"}},
          "required": ["capital", "sure"], "additionalProperties": False}
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
REQUESTS: dict[str, dict[str, Any]] = {
    "logprobs": {"messages": CAPITAL, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3},
    "seed": {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8,
             "temperature": 0.9, "seed": 1234},
    "json_schema": {"messages": CAPITAL, "max_tokens": 30, "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": ANSWER}}},
    "tools": {"messages": ASK, "max_tokens": 30, "temperature": 0, "tool_choice": "required",
              "tools": [{"type": "function", "function": WEATHER}]},
    "length": {"messages": CAPITAL, "max_tokens": 3, "temperature": 0},
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("parity")
    secret = os.urandom(32).hex()
    for name in "abd":
        Identity.load_or_create(base / name, name=name)
    a = SplitNode("a", base / "a", {})
    b = SplitNode("b", base / "b", {"mesh": {"bootstrap": [a.api]}})
    d = SplitNode("d", base / "d", {"mesh": {"bootstrap": [a.api]}}, harness_args=["--no-model"])
    nodes = [a, b, d]
    start_nodes(nodes, secret)
    try:
        def serving(node: SplitNode, others: tuple[SplitNode, ...]) -> bool:
            peers = node.peers()
            return all(n.peer_id in peers and peers[n.peer_id]["advert"].get("split", {}).get("serve_others")
                       for n in others)

        wait_until(lambda: serving(a, (b,)), 60, "a linked to b, with its advert")
        wait_until(lambda: serving(d, (a,)), 60, "d linked to a, with its advert")
        yield a, b, d
    finally:
        for node in nodes:
            node.kill(15)


def _client(node: SplitNode) -> Any:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _answer(reply: Any) -> dict[str, Any]:
    """What must be equal across routes: text, finish, the call, token logprobs, token count."""
    choice = reply.choices[0]
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
    logprobs = None
    if choice.logprobs is not None:
        logprobs = [(t.token, t.logprob, [(top.token, top.logprob) for top in t.top_logprobs])
                    for t in choice.logprobs.content]
    return {"text": choice.message.content, "finish": choice.finish_reason, "calls": calls,
            "logprobs": logprobs, "tokens": reply.usage.completion_tokens}


def _same_logprobs(got: list | None, want: list | None) -> bool:
    if got is None or want is None:
        return got is want
    if len(got) != len(want):
        return False
    for (token, value, top), (token2, value2, top2) in zip(got, want, strict=True):
        if token != token2 or abs(value - value2) > 1e-4 or [t for t, _ in top] != [t for t, _ in top2]:
            return False
        if any(abs(x - y) > 1e-4 for (_, x), (_, y) in zip(top, top2, strict=True)):
            return False
    return True


def _run(a: SplitNode, stop: list[str]) -> dict[str, Any]:
    client = _client(a)
    out: dict[str, Any] = {}
    for label, body in REQUESTS.items():
        out[label] = _answer(client.chat.completions.create(model=MODEL, **body))
    out["stop"] = _answer(client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=12,
                                                         temperature=0, stop=stop))
    messages = a.call("POST", "/v1/messages", {"model": MODEL, "max_tokens": 12, "temperature": 0,
                                               "messages": CAPITAL, "stop_sequences": stop})
    out["anthropic"] = (messages["content"][0]["text"], messages["stop_reason"], messages["stop_sequence"])
    response = client.responses.create(model=MODEL, input=ASK[0]["content"], max_output_tokens=30,
                                       temperature=0, tools=[{"type": "function", **WEATHER}],
                                       tool_choice="required")
    out["responses"] = (response.output[0].type, response.output[0].name,
                        json.loads(response.output[0].arguments))
    events = list(client.responses.create(model=MODEL, input=ASK[0]["content"], max_output_tokens=30,
                                          temperature=0, tools=[{"type": "function", **WEATHER}],
                                          tool_choice="required", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    final = events[-1].response.output[0]
    out["responses_stream"] = (final.name, json.loads(final.arguments), json.loads(deltas))
    text, streamed_logprobs = "", []
    for chunk in client.chat.completions.create(model=MODEL, **REQUESTS["logprobs"], stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed_logprobs += [(t.token, round(t.logprob, 4)) for t in chunk.choices[0].logprobs.content]
    out["chat_stream"] = (text, streamed_logprobs)
    return out


def test_features_through_offload_and_split_equal_local(mesh):
    a, b, _ = mesh
    a.force("local")
    plain = _client(a).chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=12, temperature=0)
    words = plain.choices[0].message.content.split()
    assert len(words) >= 3, plain
    stop = ["no such text", " " + words[2]]  # the second stop ends the answer mid-way
    local = _run(a, stop)
    assert local["logprobs"]["logprobs"] and len(local["logprobs"]["logprobs"][0][2]) == 3
    assert local["length"]["finish"] == "length" and local["length"]["tokens"] == 3
    jsonschema.validate(json.loads(local["json_schema"]["text"]), ANSWER)
    assert local["tools"]["finish"] == "tool_calls" and local["tools"]["calls"][0][0] == "get_weather"
    assert local["stop"]["finish"] == "stop" and stop[1] not in local["stop"]["text"]
    assert local["anthropic"][1:] == ("stop_sequence", stop[1]), local["anthropic"]
    assert local["responses"][:2] == ("function_call", "get_weather")
    assert local["responses_stream"][:2] == local["responses"][1:]  # streamed as whole
    assert local["responses_stream"][1] == local["responses_stream"][2]  # the deltas add up to the arguments
    assert local["chat_stream"][0] == local["logprobs"]["text"] and len(local["chat_stream"][1]) == 5
    routes = {"offload": ("offload", (b.peer_id, "0:30")),
              "split": ("split", ("local", "0:15"), (b.peer_id, "15:30"))}
    for label, (kind, *stages) in routes.items():
        a.force(kind, *stages)
        got = _run(a, stop)
        for name, want in local.items():
            if isinstance(want, dict):
                assert _same_logprobs(got[name].pop("logprobs"), want["logprobs"]), (label, name)
                want = {k: v for k, v in want.items() if k != "logprobs"}
            assert got[name] == want, (label, name, got[name], want)
        kinds = {r["route"]["kind"] for r in a.call("GET", "/v1/mesh/requests?limit=10")["requests"]}
        assert kinds == {kind}, (label, kinds)
    a.force(None)


def test_node_without_the_model_embeds_and_generates_through_a_peer(mesh):
    a, _, d = mesh
    a.force("local")
    texts = ["hello world", "the sky is blue"]
    held = _client(a).embeddings.create(model=MODEL, input=texts, encoding_format="float")
    remote = _client(d).embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [e.embedding for e in remote.data] == [e.embedding for e in held.data]
    assert remote.usage.prompt_tokens == held.usage.prompt_tokens
    packed = _client(d).embeddings.create(model=MODEL, input=texts, encoding_format="base64")
    for item, want in zip(packed.data, held.data, strict=True):
        got = np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
        assert np.array_equal(got, np.asarray(want.embedding, dtype=np.float32))
    ollama = d.call("POST", "/api/embed", {"model": MODEL, "input": texts[0]})
    assert ollama["embeddings"][0] == pytest.approx(held.data[0].embedding, abs=1e-7)
    for label in ("json_schema", "logprobs"):
        want = _answer(_client(a).chat.completions.create(model=MODEL, **REQUESTS[label]))
        got = _answer(_client(d).chat.completions.create(model=MODEL, **REQUESTS[label]))
        assert _same_logprobs(got.pop("logprobs"), want.pop("logprobs")) and got == want, (label, got, want)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                         "properties": 5}}}
    with pytest.raises(openai.BadRequestError) as err:
        _client(d).chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=5, response_format=bad)
    # checked where the tokenizer is (here, for a model opened from its header; else on the peer)
    assert (err.value.body["code"], err.value.body["param"]) in (("invalid_value", "response_format"),
                                                                 ("peer_bad_request", None))
    assert "schema" in err.value.body["message"]
    a.force(None)
