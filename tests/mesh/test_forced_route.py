"""`PUT /v1/mesh/route` forces the router's route through `Router.force` and clears it again; a bad body is a
400 that leaves the route as it was (a real node's split service behind a real aiohttp server on loopback)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from shoal.mesh.node.config import NodeConfig
from shoal.mesh.node.node import build_node
from shoal.mesh.split.service import SplitService


async def test_put_route_forces_and_clears_the_routers_route(tmp_path: Path) -> None:
    node = build_node(NodeConfig(name="forced", data_dir=tmp_path))
    try:
        split = next(service for service in node.services if isinstance(service, SplitService))
        assert node.router is split.router and split.router.forced is None
        app = web.Application()
        split.add_routes(app)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            reply = await client.put("/v1/mesh/route", json={"kind": "local"})
            assert reply.status == 200
            assert (await reply.json())["forced"] == {"kind": "local", "stages": []}
            assert split.router.forced is not None and split.router.forced.kind == "local"

            reply = await client.put("/v1/mesh/route", json={"kind": "teleport"})
            assert reply.status == 400 and (await reply.json())["error"]["code"] == "bad_route"
            assert split.router.forced is not None and split.router.forced.kind == "local"

            reply = await client.put("/v1/mesh/route", json={})
            assert reply.status == 200 and (await reply.json())["forced"] is None
            assert split.router.forced is None
    finally:
        await node.stop()
