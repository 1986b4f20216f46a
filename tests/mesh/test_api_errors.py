"""Every error path of the OpenAI endpoints answers with OpenAI's error body and the right status."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.mesh.api_harness import MODEL, NodeThread, chat_body

pytestmark = pytest.mark.timeout(300)


def check_error(body: Any, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


async def request(node: NodeThread, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, node.url + path, **kwargs) as r:
        return r.status, await r.json(content_type=None), r.headers


BAD_CHAT = [
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content",
        "unsupported_value",
    ),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "unsupported_value"),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"max_tokens": -3}, "max_tokens", None),
    ({"max_tokens": "8"}, "max_tokens", "invalid_type"),
    ({"max_tokens": 10**9}, "max_tokens", None),
    ({"max_completion_tokens": 0}, "max_completion_tokens", None),
    ({"temperature": "hot"}, "temperature", "invalid_type"),
    ({"temperature": True}, "temperature", "invalid_type"),
    ({"temperature": 2.5}, "temperature", None),
    ({"top_p": 0}, "top_p", None),
    ({"top_p": 1.5}, "top_p", None),
    ({"seed": 1.5}, "seed", "invalid_type"),
    ({"stop": 5}, "stop", "invalid_type"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"stop": [""]}, "stop", None),
    ({"presence_penalty": 3}, "presence_penalty", None),
    ({"frequency_penalty": -2.5}, "frequency_penalty", None),
    ({"n": 2}, "n", "unsupported_value"),
    ({"logprobs": "yes"}, "logprobs", "invalid_type"),
    ({"top_logprobs": 3}, "top_logprobs", None),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
    ({"min_p": 1.5}, "min_p", None),
    ({"tools": [{"type": "function"}]}, "tools[0]", "invalid_type"),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "unsupported_value"),
    ({"logit_bias": {"42": 5}}, "logit_bias", "unsupported_parameter"),
    ({"stream": "yes"}, "stream", "invalid_type"),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ({"model": 7}, "model", "invalid_type"),
]


@pytest.mark.parametrize(("change", "param", "code"), BAD_CHAT)
async def test_bad_chat_parameters_are_400_naming_the_parameter(
    node: NodeThread, change: dict[str, Any], param: str, code: str | None
) -> None:
    status, body, headers = await request(
        node, "POST", "/v1/chat/completions", json={**chat_body(), **change}
    )
    assert status == 400, body
    error = check_error(body, param, code)
    assert error["type"] == "invalid_request_error"
    assert headers["x-shoal-route"] == "local"


BAD_COMPLETION = [
    ({"prompt": None}, "prompt", "missing_required_parameter"),
    ({"prompt": 12}, "prompt", "invalid_type"),
    ({"prompt": ["a", "b"]}, "prompt", "unsupported_value"),
    ({"prompt": [1, -2]}, "prompt", None),
    ({"prompt": [10**7]}, "prompt", None),
    ({"prompt": ""}, "prompt", None),
    ({"echo": True}, "echo", "unsupported_parameter"),
    ({"best_of": 3}, "best_of", "unsupported_parameter"),
    ({"suffix": "end"}, "suffix", "unsupported_parameter"),
    ({"logprobs": 21}, "logprobs", None),
    ({"logprobs": True}, "logprobs", "invalid_type"),
]


@pytest.mark.parametrize(("change", "param", "code"), BAD_COMPLETION)
async def test_bad_completion_parameters_are_400(
    node: NodeThread, change: dict[str, Any], param: str, code: str | None
) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **change}
    status, data, _ = await request(node, "POST", "/v1/completions", json=body)
    assert status == 400, data
    check_error(data, param, code)


async def test_malformed_json_is_400(node: NodeThread) -> None:
    status, body, _ = await request(
        node,
        "POST",
        "/v1/chat/completions",
        data=b'{"model": "x", ',
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    check_error(body, None, "invalid_json")
    json_type = {"Content-Type": "application/json"}
    status, body, _ = await request(node, "POST", "/v1/chat/completions", data=b"[1, 2]", headers=json_type)
    assert status == 400
    check_error(body, None, "invalid_type")
    status, body, _ = await request(node, "POST", "/v1/chat/completions", data=b"", headers=json_type)
    assert status == 400
    check_error(body, None, "invalid_json")
    status, body, _ = await request(node, "POST", "/v1/chat/completions", data=b"{}")  # no Content-Type
    assert status == 415
    check_error(body, None, "unsupported_media_type")


async def test_unknown_model_is_404(node: NodeThread) -> None:
    status, body, _ = await request(node, "POST", "/v1/chat/completions", json=chat_body(model="gpt-17"))
    assert status == 404
    error = check_error(body, "model", "model_not_found")
    assert "gpt-17" in error["message"]


async def test_prompt_longer_than_the_context_is_400(node: NodeThread) -> None:
    served = node.node.models.served(MODEL)
    assert served is not None
    long_text = "word " * (served.context_length + 100)
    status, body, _ = await request(node, "POST", "/v1/chat/completions", json=chat_body(long_text))
    assert status == 400
    error = check_error(body, "messages", "context_length_exceeded")
    assert str(served.context_length) in error["message"]
    status, body, _ = await request(
        node,
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": served.context_length},
    )
    assert status == 400
    check_error(body, "max_tokens", "context_length_exceeded")


async def test_body_over_the_limit_is_413(node: NodeThread) -> None:
    limit = node.node.config.api.max_body_bytes
    status, body, _ = await request(
        node,
        "POST",
        "/v1/chat/completions",
        data=b" " * (limit + 1),
        headers={"Content-Type": "application/json"},
    )
    assert status == 413
    check_error(body, None, "request_too_large")


async def test_wrong_method_is_405_and_unknown_path_404(node: NodeThread) -> None:
    status, body, headers = await request(node, "GET", "/v1/chat/completions")
    assert status == 405
    check_error(body, None, "method_not_allowed")
    assert "POST" in headers["Allow"]
    status, body, headers = await request(node, "DELETE", "/v1/models")
    assert status == 405
    status, body, headers = await request(node, "GET", "/v1/no/such/thing")
    assert status == 404
    check_error(body, None, "unknown_url")
    assert headers["x-shoal-route"] == "local"


async def test_errors_are_counted_in_metrics(node: NodeThread) -> None:
    await request(node, "GET", "/v1/definitely-missing")
    async with aiohttp.ClientSession() as session, session.get(node.url + "/metrics") as r:
        text = await r.text()
    assert 'shoal_http_requests_total{endpoint="unmatched",method="GET",status="404"}' in text
