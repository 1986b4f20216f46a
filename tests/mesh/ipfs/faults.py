"""A misbehaving gateway for fault-injection tests: serves wrong blocks, truncated CARs or garbage, or is
just slow. It reads a real block store; only the fault is fake."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from aiohttp import web
from shoal.mesh.ipfs import car
from shoal.mesh.ipfs.cid import parse_cid
from shoal.mesh.ipfs.reader import decode_file_node
from shoal.mesh.ipfs.store import BlockStore

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


class FaultyRpc:
    """An IPFS node's RPC API over a real block store whose `cat` misbehaves: flips a byte in the middle of
    the file (`wrong`), stops halfway (`truncate`) or sends extra bytes (`longer`); `none` is honest.
    `block/get` is always honest; `dag/export` is not offered."""

    CAT_MODES = ("wrong", "truncate", "longer", "none")

    def __init__(self, store: BlockStore, mode: str) -> None:
        if mode not in self.CAT_MODES:
            raise ValueError(mode)
        self.store = store
        self.mode = mode
        self.requests: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v0/block/get", self.block_get)
        app.router.add_post("/api/v0/cat", self.cat)
        app.router.add_post("/api/v0/dag/export", self.export)
        return app

    async def block_get(self, request: web.Request) -> web.Response:
        self.requests["block/get"] += 1
        block = self.store.get(parse_cid(request.query["arg"]))
        if block is None:
            return web.Response(status=500, text='{"Message":"block not found"}')
        return web.Response(body=block)

    async def export(self, request: web.Request) -> web.Response:
        self.requests["dag/export"] += 1
        raise web.HTTPNotFound()

    async def cat(self, request: web.Request) -> web.StreamResponse:
        self.requests["cat"] += 1
        data = bytearray()
        stack = [parse_cid(request.query["arg"])]
        while stack:
            cid = stack.pop()
            node = decode_file_node(cid, self.store.get(cid) or b"")
            data += node.data
            stack.extend(child for child, _ in reversed(node.children))
        if self.mode == "wrong":
            data[len(data) // 2] ^= 0x01
        elif self.mode == "truncate":
            del data[len(data) // 2:]
        elif self.mode == "longer":
            data += b"\0" * 10
        response = web.StreamResponse()
        await response.prepare(request)
        for start in range(0, len(data), 100_000):  # several chunks, so leaves span chunk boundaries
            await response.write(bytes(data[start:start + 100_000]))
        await response.write_eof()
        return response
