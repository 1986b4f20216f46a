"""A misbehaving gateway for fault-injection tests: serves wrong blocks, truncated CARs or garbage, or is
just slow. It reads a real block store; only the fault is fake."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from aiohttp import web

from mesh.ipfs import car
from mesh.ipfs.cid import parse_cid
from mesh.ipfs.reader import decode_file_node
from mesh.ipfs.store import BlockStore

MODES = ("wrong", "truncate", "garbage", "slow", "none")


class FaultyGateway:
    def __init__(self, store: BlockStore, mode: str, delay_s: float = 0.0, car: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(mode)
        self.store = store
        self.mode = mode
        self.delay_s = delay_s
        self.serve_car = car
        self.requests: Counter[str] = Counter()
        self._rng = random.Random(7)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ipfs/{cid}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        cid = parse_cid(request.match_info["cid"])
        fmt = request.query.get("format", "raw")
        self.requests[fmt] += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if fmt == "car":
            if not self.serve_car:
                raise web.HTTPNotFound()
            return await self._car(request, cid)
        block = self.store.get(cid)
        if block is None:
            raise web.HTTPNotFound()
        if self.mode == "wrong":
            block = bytes([block[0] ^ 0xFF]) + block[1:]
        elif self.mode == "truncate":
            block = block[: len(block) // 2]
        elif self.mode == "garbage":
            block = self._rng.randbytes(1000)
        return web.Response(body=block, content_type="application/vnd.ipld.raw")

    async def _car(self, request: web.Request, root) -> web.StreamResponse:
        sections = []
        stack = [root]
        while stack:
            cid = stack.pop()
            block = self.store.get(cid)
            if block is None:
                raise web.HTTPNotFound()
            sections.append((cid, block))
            stack.extend(child for child, _ in reversed(decode_file_node(cid, block).children))
        body = car.encode_header([root])
        for i, (cid, block) in enumerate(sections):
            if self.mode == "wrong" and i == len(sections) // 2:
                block = block[:-1] + bytes([block[-1] ^ 1])
            body += car.encode_section(cid, block)
        if self.mode == "truncate":
            body = body[: len(body) // 2]
        elif self.mode == "garbage":
            body = self._rng.randbytes(5000)
        return web.Response(body=body, content_type=car.CONTENT_TYPE)
