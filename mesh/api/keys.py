"""Typed keys of the aiohttp application and request state shared by the API modules."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from shoal.mesh.api.ports import NodePort, RouterPort

NODE: web.AppKey[NodePort] = web.AppKey("node")
"""The node the app serves (config, bus, models, metrics, request log, logs, policy)."""

ROUTER: web.AppKey[RouterPort | None] = web.AppKey("router")
"""Routes completions (local, offload, split) when the node has one; None streams from the local engine."""

INFLIGHT: web.AppKey[set[asyncio.Task[object]]] = web.AppKey("inflight")
"""Handler tasks of completion requests in progress: graceful shutdown waits for them, then cancels them."""

ROUTE_HEADER = "x-shoal-route"
"""Route kind of a response (`local`, `offload`, `split`); responses that set none get `local`."""
