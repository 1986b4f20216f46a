"""Node administration endpoints: health, node info, policy, events (SSE), logs, recent requests, metrics,
and model compile / load / unload."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from shoal.mesh.api.errors import ApiError, invalid, json_response
from shoal.mesh.api.keys import NODE
from shoal.mesh.api.openai_routes import read_json
from shoal.mesh.api.sse import open_sse

logger = logging.getLogger(__name__)

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""The log levels `GET /v1/logs?level=` accepts."""

EVENTS_KEEPALIVE_S = 15.0
MAX_LOG_LINES = 10_000


async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return json_response(
        {
            "status": "ok",
            "node": {"id": node.id, "name": node.name, "version": node.version},
            "models": node.models.loaded_names(),
        }
    )


async def node_info(request: web.Request) -> web.Response:
    return json_response(request.app[NODE].describe())


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    node.metrics.active_streams.set(node.models.active_sequences())
    node.metrics.engine_waiting.set(node.models.waiting())
    reserved, capacity = node.models.kv_usage()
    node.metrics.kv_reserved.set(reserved)
    node.metrics.kv_capacity.set(capacity)
    return web.Response(body=node.metrics.render(), headers={"Content-Type": node.metrics.content_type})


async def get_policy(request: web.Request) -> web.Response:
    return json_response(request.app[NODE].policy.to_dict())


async def put_policy(request: web.Request) -> web.Response:
    node = request.app[NODE]
    changes = await read_json(request)
    if not isinstance(changes, dict):
        raise invalid("the policy update must be a JSON object", None, "invalid_type")
    try:
        policy = node.set_policy(changes)
    except ValueError as exc:  # the node's ConfigError
        param = next((key for key in changes if f" {key}" in str(exc)), None)
        raise invalid(str(exc).removeprefix("[policy] "), param) from None
    return json_response(policy.to_dict())


async def events(request: web.Request) -> web.StreamResponse:
    """SSE: one `data: {"seq","time","kind","data"}` frame per bus event; `?replay=1` sends recent ones
    first."""
    node = request.app[NODE]
    replay = request.query.get("replay", "0") in ("1", "true", "yes")
    if node.draining:
        raise ApiError(503, "the node is shutting down", code="shutdown", type="server_error")
    subscription = node.bus.subscribe(replay=replay)
    sse = None
    try:
        sse = await open_sse(request)
        await sse.comment("shoal events")
        while True:
            try:
                async with asyncio.timeout(EVENTS_KEEPALIVE_S):  # wait_for can lose a cancellation (3.11)
                    event = await subscription.get()
            except TimeoutError:
                await sse.comment("keep-alive")
                continue
            except StopAsyncIteration:
                break
            await sse.send(event.to_dict())
        await sse.response.write_eof()
    except ConnectionResetError:
        pass  # the client left
    finally:
        subscription.close()
    return sse.response if sse is not None else web.Response(status=499)


async def logs(request: web.Request) -> web.Response:
    level = request.query.get("level", "INFO").upper()
    if level not in LEVELS:
        raise invalid(f"level must be one of {', '.join(LEVELS)}", "level")
    try:
        limit = int(request.query.get("limit", "200"))
    except ValueError:
        raise invalid("limit must be an integer", "limit", "invalid_type") from None
    if not 0 <= limit <= MAX_LOG_LINES:
        raise invalid(f"limit must be between 0 and {MAX_LOG_LINES}", "limit")
    return json_response({"lines": request.app[NODE].log_bridge.lines(level, limit)})


async def mesh_requests(request: web.Request) -> web.Response:
    try:
        limit = int(request.query["limit"]) if "limit" in request.query else None
    except ValueError:
        raise invalid("limit must be an integer", "limit", "invalid_type") from None
    if limit is not None and limit < 0:
        raise invalid("limit must not be negative", "limit")
    return json_response({"requests": request.app[NODE].requests.recent(limit)})


async def _optional_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    body = await read_json(request) if request.content_length != 0 else {}
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    return body


def _string_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise invalid(f"'{name}' must be a non-empty string", name, "invalid_type")
    return value


async def compile_model(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body = await _optional_body(request)
    target = _string_field(body, "target")
    layers = _string_field(body, "layers")
    if target is not None and target not in ("auto", "llvm", "cuda"):
        raise invalid("'target' must be one of auto, llvm, cuda", "target")
    name = request.match_info["id"]
    node.models.resolve(name)
    try:
        result = await node.models.compile(name, None if target == "auto" else target, layers)
    except ValueError as exc:
        raise invalid(str(exc), "layers") from None
    return json_response(result)


async def load_model(request: web.Request) -> web.Response:
    node = request.app[NODE]
    await _optional_body(request)
    served = await node.models.load(request.match_info["id"])
    return json_response({"model": served.name, "loaded": True, "backend": served.backend})


async def unload_model(request: web.Request) -> web.Response:
    node = request.app[NODE]
    await _optional_body(request)
    name = request.match_info["id"]
    node.models.resolve(name)
    if node.requests_running(name):
        raise ApiError(
            409, f"the model '{name}' is serving requests; try again when they finish", code="busy"
        )
    was_loaded = await node.models.unload(name)
    return json_response({"model": name, "loaded": False, "was_loaded": was_loaded})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/node", node_info)
    app.router.add_get("/v1/policy", get_policy)
    app.router.add_put("/v1/policy", put_policy)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/v1/logs", logs)
    app.router.add_get("/v1/mesh/requests", mesh_requests)
    app.router.add_post("/v1/models/{id}/compile", compile_model)
    app.router.add_post("/v1/models/{id}/load", load_model)
    app.router.add_post("/v1/models/{id}/unload", unload_model)
