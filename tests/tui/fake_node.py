"""Development aid only: a tiny stand-in for `shoal node`'s API, used to build the TUI before the real node
existed and to view screens by hand (`python -m tests.tui.fake_node 8799`). The tests run a real node."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
from aiohttp import web

EVENTS: web.AppKey[list[asyncio.Queue[dict[str, Any]]]] = web.AppKey("events", list)
STATE: web.AppKey[dict[str, Any]] = web.AppKey("state", dict)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def publish(app: web.Application, kind: str, **data: Any) -> None:
    event = {"seq": 0, "time": time.time(), "kind": kind, "data": data}
    for queue in app[EVENTS]:
        queue.put_nowait(event)


async def events(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    request.app[EVENTS].append(queue)
    try:
        while True:
            event = await queue.get()
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
    finally:
        request.app[EVENTS].remove(queue)


async def pull(request: web.Request) -> web.Response:
    body = await request.json()
    app = request.app

    async def run() -> None:
        for i in range(1, 6):
            await asyncio.sleep(0.1)
            publish(
                app,
                "pull.progress",
                pull_id="p1",
                model=body["model"],
                cid="bafy",
                bytes_done=i * 20,
                bytes_total=100,
                blocks_done=i,
                rate_bps=200.0,
                eta_s=(5 - i) * 0.1,
            )
        publish(app, "pull.done", pull_id="p1", model=body["model"])

    app[STATE]["tasks"].add(asyncio.ensure_future(run()))
    return _json({"pull_id": "p1", "cid": "bafy"}, 202)


async def chat(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-shoal-route": "local"})
    await resp.prepare(request)
    for word in ["Paris ", "is ", "the ", "capital."]:
        chunk = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await asyncio.sleep(0.05)
    final = {
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "shoal_route": {"kind": "local", "peers": [], "spans": [], "replans": 0},
    }
    await resp.write(b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
    return resp


async def put_policy(request: web.Request) -> web.Response:
    request.app[STATE]["policy"].update(await request.json())
    publish(request.app, "policy.changed", policy=request.app[STATE]["policy"])
    return _json(request.app[STATE]["policy"])


def make_app() -> web.Application:
    app = web.Application()
    app[EVENTS] = []
    app[STATE] = {
        "tasks": set(),
        "policy": {
            "serve_others": True,
            "battery_floor": 20,
            "max_memory_share": 0.5,
            "trusted_only_splits": False,
            "prefer_local": True,
        },
    }
    node = {"id": "12D3KooFake", "name": "fake", "version": "0.1.0"}
    model = {
        "id": "smollm2-135m-instruct",
        "object": "model",
        "created": 0,
        "owned_by": "shoal",
        "shoal": {
            "cid": "bafybeifake",
            "size": 98362432,
            "pinned": True,
            "loaded": True,
            "compiled_targets": ["llvm"],
        },
    }
    app.router.add_get("/health", lambda r: _json({"status": "ok", "node": node, "models": [model["id"]]}))
    app.router.add_get("/v1/node", lambda r: _json({**node, "target": "llvm", "api": "", "policy": {}}))
    app.router.add_get("/v1/models", lambda r: _json({"object": "list", "data": [model]}))
    app.router.add_get("/v1/policy", lambda r: _json(r.app[STATE]["policy"]))
    app.router.add_put("/v1/policy", put_policy)
    app.router.add_get("/v1/events", events)
    app.router.add_post("/v1/models/pull", pull)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get(
        "/v1/mesh/requests",
        lambda r: _json(
            {
                "requests": [
                    {
                        "id": "r1",
                        "model": model["id"],
                        "route": {"kind": "split", "replans": 1},
                        "status": "ok",
                        "ttft_ms": 120,
                        "tokens": 12,
                        "tok_s": 30.5,
                        "started": 1.0,
                        "finished": 2.0,
                    }
                ]
            }
        ),
    )
    app.router.add_get(
        "/v1/logs",
        lambda r: _json(
            {
                "lines": [
                    {"time": 0, "level": "INFO", "logger": "mesh.node", "message": "node started"},
                    {"time": 0, "level": "WARNING", "logger": "mesh.peer", "message": "slow peer"},
                ]
            }
        ),
    )
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8799)
