"""Node admin endpoints: health, node, policy, events, logs, recent requests, metrics, model load/unload."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from tests.mesh.api_harness import MODEL, NodeThread, chat_body

pytestmark = pytest.mark.timeout(300)


async def call(node: NodeThread, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, node.url + path, **kwargs) as r:
        assert r.headers["x-shoal-route"] == "local"
        return r.status, await r.json(content_type=None)


async def test_health_and_node(node: NodeThread) -> None:
    status, health = await call(node, "GET", "/health")
    assert status == 200
    assert health["status"] == "ok"
    assert health["node"]["id"].startswith("p") and health["node"]["name"] == "test-node"
    assert MODEL in health["models"]
    status, info = await call(node, "GET", "/v1/node")
    assert status == 200
    assert info["id"] == health["node"]["id"] and info["version"] == health["node"]["version"]
    assert info["api"] == node.url
    assert info["backend"] == node.node.config.models.backend
    # The compile target (llvm, cuda), not the backend; a NumPy node compiles nothing.
    assert info["target"] in (("numpy",) if info["backend"] == "numpy" else ("llvm", "cuda", "auto"))
    assert info["data_dir"] == str(node.node.config.data_dir)
    assert isinstance(info["started"], float)
    assert set(info["policy"]) == {
        "serve_others",
        "battery_floor",
        "max_memory_share",
        "trusted_only_splits",
        "prefer_local",
        "max_tokens_per_peer_per_hour",
        "metered",
    }


async def next_event(response: aiohttp.ClientResponse, kind: str) -> dict[str, Any]:
    async for line in response.content:
        if line.startswith(b"data: "):
            event = orjson.loads(line[6:])
            if event["kind"] == kind:
                return event
    raise AssertionError(f"event stream ended before a {kind} event")


async def test_policy_put_applies_validates_and_publishes(node: NodeThread) -> None:
    status, before = await call(node, "GET", "/v1/policy")
    assert status == 200
    async with aiohttp.ClientSession() as session, session.get(node.url + "/v1/events") as events:
        assert events.status == 200
        assert events.headers["Content-Type"].startswith("text/event-stream")
        status, after = await call(
            node, "PUT", "/v1/policy", json={"battery_floor": 42, "serve_others": True}
        )
        assert status == 200, after
        assert after == {**before, "battery_floor": 42, "serve_others": True}
        event = await asyncio.wait_for(next_event(events, "policy.changed"), 30)
        log = await asyncio.wait_for(next_event(events, "log"), 30)
    assert event["data"]["policy"] == after
    assert log["data"]["logger"] == "shoal.mesh.node.node" and log["data"]["level"] == "INFO"
    assert "policy changed" in log["data"]["message"]
    assert isinstance(event["seq"], int) and isinstance(event["time"], float)
    status, now = await call(node, "GET", "/v1/policy")
    assert now == after
    for bad, param in (
        ({"battery_floor": 101}, "battery_floor"),
        ({"max_memory_share": "half"}, "max_memory_share"),
        ({"serve_others": 1}, "serve_others"),
        ({"teleport": True}, None),
    ):
        status, body = await call(node, "PUT", "/v1/policy", json=bad)
        assert status == 400, body
        assert body["error"]["type"] == "invalid_request_error"
        if param:
            assert body["error"]["param"] == param
    status, body = await call(node, "PUT", "/v1/policy", json=[1])
    assert status == 400
    status, now = await call(node, "GET", "/v1/policy")
    assert now == after  # failed updates changed nothing
    await call(node, "PUT", "/v1/policy", json=before)


async def test_requests_are_listed_with_events(node: NodeThread) -> None:
    async with aiohttp.ClientSession() as session, session.get(node.url + "/v1/events") as events:
        async with session.post(node.url + "/v1/chat/completions", json=chat_body(max_tokens=2)) as r:
            assert r.status == 200
            answer = await r.json()
        finished = await asyncio.wait_for(next_event(events, "request.finished"), 30)
    assert finished["data"]["id"] == answer["id"]
    assert finished["data"]["tokens"] == 2 and finished["data"]["status"] == "length"
    assert finished["data"]["route"]["kind"] == "local"
    status, listing = await call(node, "GET", "/v1/mesh/requests")
    assert status == 200
    (mine,) = [r for r in listing["requests"] if r["id"] == answer["id"]]
    assert mine["model"] == MODEL and mine["status"] == "length" and mine["tokens"] == 2
    assert mine["ttft_ms"] > 0 and mine["finished"] >= mine["started"]
    status, limited = await call(node, "GET", "/v1/mesh/requests?limit=1")
    assert len(limited["requests"]) == 1
    status, body = await call(node, "GET", "/v1/mesh/requests?limit=x")
    assert status == 400 and body["error"]["param"] == "limit"


async def test_logs_filter_by_level_and_limit(node: NodeThread) -> None:
    status, body = await call(node, "GET", "/v1/logs?level=INFO&limit=500")
    assert status == 200
    lines = body["lines"]
    assert any("listening on" in line["message"] for line in lines)
    assert all(set(line) == {"time", "level", "logger", "message"} for line in lines)
    status, body = await call(node, "GET", "/v1/logs?limit=1")
    assert len(body["lines"]) == 1
    status, body = await call(node, "GET", "/v1/logs?level=ERROR")
    assert all(line["level"] in ("ERROR", "CRITICAL") for line in body["lines"])
    status, body = await call(node, "GET", "/v1/logs?level=LOUD")
    assert status == 400 and body["error"]["param"] == "level"


async def test_metrics_report_requests_tokens_latency_and_queue(node: NodeThread) -> None:
    status, _ = await call(node, "POST", "/v1/chat/completions", json=chat_body(max_tokens=3))
    assert status == 200
    async with aiohttp.ClientSession() as session, session.get(node.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    chat_ok = 'shoal_http_requests_total{endpoint="/v1/chat/completions",method="POST",status="200"}'
    assert samples[chat_ok] >= 1
    assert samples[f'shoal_completion_tokens_total{{model="{MODEL}"}}'] >= 3
    assert samples[f'shoal_time_to_first_token_seconds_count{{model="{MODEL}"}}'] >= 1
    assert samples[f'shoal_inter_token_latency_seconds_count{{model="{MODEL}"}}'] >= 2
    assert samples["shoal_queue_depth"] == 0
    assert samples["shoal_active_sequences"] == 0
    assert samples["shoal_engine_waiting"] == 0


async def test_model_admin_errors(node: NodeThread) -> None:
    for action in ("load", "unload", "compile"):
        status, body = await call(node, "POST", f"/v1/models/nope/{action}")
        assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = await call(node, "POST", f"/v1/models/{MODEL}/compile", json={"layers": "9:3"})
    assert status == 400 and body["error"]["param"] == "layers"
    status, body = await call(node, "POST", f"/v1/models/{MODEL}/compile", json={"target": "abacus"})
    assert status == 400 and body["error"]["param"] == "target"


async def test_unload_then_load(node: NodeThread) -> None:
    async with aiohttp.ClientSession() as session, session.get(node.url + "/v1/events") as events:
        status, body = await call(node, "POST", f"/v1/models/{MODEL}/unload")
        assert status == 200 and body == {"model": MODEL, "loaded": False, "was_loaded": True}
        assert (await asyncio.wait_for(next_event(events, "model.unloaded"), 30))["data"]["model"] == MODEL
        status, health = await call(node, "GET", "/health")
        assert MODEL not in health["models"]
        status, body = await call(node, "POST", f"/v1/models/{MODEL}/load")
        assert status == 200 and body["loaded"] is True
        assert (await asyncio.wait_for(next_event(events, "model.loaded"), 300))["data"]["model"] == MODEL
    status, health = await call(node, "GET", "/health")
    assert MODEL in health["models"]
    status, answer = await call(node, "POST", "/v1/chat/completions", json=chat_body(max_tokens=1))
    assert status == 200 and answer["usage"]["completion_tokens"] == 1


@pytest.mark.slow
async def test_compile_a_layer_range(node: NodeThread) -> None:
    async with aiohttp.ClientSession() as session, session.get(node.url + "/v1/events") as events:
        status, body = await call(node, "POST", f"/v1/models/{MODEL}/compile", json={"layers": "0:2"})
        assert status == 200, body
        assert body == {"model": MODEL, "layers": "0:2", "target": "auto"}
        done = await asyncio.wait_for(next_event(events, "compile.done"), 600)
    assert done["data"]["model"] == MODEL and done["data"]["span"] == "0:2"
    status, listing = await call(node, "GET", "/v1/models")
    (entry,) = [m for m in listing["data"] if m["id"] == MODEL]
    assert "llvm" in entry["shoal"]["compiled_targets"]
