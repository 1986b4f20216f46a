"""`OffloadClient` against a real `OffloadServer` (NumPy reference engine) and a real `TensorLinkServer` on
127.0.0.1, in one process: the control channel between them is an in-process pair of peers (as
`tests/mesh/stage_links.py` stands in for a stage's), the token link a real TCP connection. Over the link the
tokens equal those of the channel; a server that does not take the link (an older node) and a link cut before
the first token (the injected fault: the serving node drops the origin's links right after the open) leave
the request on the data channel with the same tokens."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from shoal.mesh.p2p.errors import RemoteError
from shoal.mesh.p2p.protocol import ControlFrame
from shoal.mesh.split import wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.offload import OffloadClient, params_to_wire
from shoal.mesh.split.offload_server import OffloadServer
from shoal.mesh.split.tensor_link import TENSOR_LINK, LinkError
from shoal.mesh.split.tensor_link_server import TensorLinkServer
from shoal.models.generate import Engine
from shoal.models.sampling import SamplingParams
from shoal.models.served import ServedModel

from tests.mesh.test_offload_server import FakeMesh
from tests.models.shared_model import chat_ids, reference_stage, tokenizer

MODEL = "smollm2-135m-instruct"
TOKENS = 6


class Side(FakeMesh):
    """One node's handlers (what `MeshService.on_control` keeps), the tasks it spawns, and its peers."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: dict[str, Peer] = {}

    def peer(self, peer_id: str) -> Peer:
        return self.peers[peer_id]


class Peer:
    """This side's view of the other node: its requests and notifications run the other side's handlers."""

    def __init__(self, peer_id: str, other: Side, me: str) -> None:
        self.peer_id = peer_id
        self._other = other
        self._me = me
        self.advert: dict[str, Any] = {"api": "127.0.0.1:1"}
        self.api_address: str | None = None
        self.rtt_s: float | None = None
        self.is_open = True
        self.last_seen = time.monotonic()
        self.sent: list[str] = []

    async def request(self, frame_type: str, body: dict[str, Any], timeout_s: float | None = None) -> Any:
        self.sent.append(frame_type)
        handler = self._other.control.get(frame_type)
        if handler is None:
            raise RemoteError("unsupported", frame_type)
        reply = await handler(self._other.peers[self._me], ControlFrame(frame_type, body))
        self.last_seen = time.monotonic()
        return reply

    async def notify(self, frame_type: str, body: dict[str, Any]) -> None:
        self.sent.append(frame_type)
        if frame_type == "ping":  # the other node's loop answers at once
            self.last_seen = time.monotonic()
            return
        handler = self._other.control.get(frame_type)
        if handler is not None:
            await handler(self._other.peers[self._me], ControlFrame(frame_type, body))
        self._other.peers[self._me].last_seen = time.monotonic()


@contextlib.asynccontextmanager
async def pair(link_on_open: str = "take") -> AsyncIterator[tuple[OffloadClient, OffloadServer, Side]]:
    """An origin's client and a serving node's server. `link_on_open`: "take" (the product), "ignore" (a node
    that answers without taking it), "cut" (the serving node drops the origin's links after the open)."""
    stage = reference_stage(0, 30)
    async with Engine([stage], tokenizer()) as engine:
        served = ServedModel(name=MODEL, tokenizer=tokenizer(), engine=engine,
                             context_length=engine.max_context, stages=[stage], backend="numpy")

        async def acquire(name: str) -> ServedModel:
            return served

        origin, serving = Side(), Side()
        origin.peers["b"] = Peer("b", serving, "a")
        serving.peers["a"] = Peer("a", origin, "b")
        links = TensorLinkServer(lambda link: link.close(), SplitConfig())
        links.start("127.0.0.1")
        server = OffloadServer(serving, acquire, lambda: None, links=links)  # type: ignore[arg-type]

        async def grant(peer: Peer, frame: ControlFrame) -> dict[str, Any]:
            try:
                return links.grant(peer.peer_id, park=frame.body.get("for") == "offload")
            except LinkError as exc:
                raise RemoteError("unavailable", str(exc)) from None

        serving.control[TENSOR_LINK] = grant
        product_open = serving.control[wire.OFFLOAD_OPEN]

        async def open_(peer: Peer, frame: ControlFrame) -> dict[str, Any]:
            if link_on_open == "ignore":
                frame = ControlFrame(frame.type, {k: v for k, v in frame.body.items() if k != "link"})
                return {"accepted": (await product_open(peer, frame))["accepted"]}
            reply = await product_open(peer, frame)
            if link_on_open == "cut" and frame.body.get("link") is not None:
                links.drop_peer(peer.peer_id)
            return reply

        serving.control[wire.OFFLOAD_OPEN] = open_
        client = OffloadClient(origin, settings=SplitConfig())  # type: ignore[arg-type]
        try:
            yield client, server, origin
        finally:
            await server.stop()
            links.stop()


async def generate(client: OffloadClient) -> list[int]:
    params = params_to_wire(SamplingParams(temperature=0.0, max_tokens=TOKENS))
    prompt = chat_ids("What is the capital of France?")
    return [event.token_id async for event in client.stream("b", MODEL, prompt, params)]


async def test_tokens_over_the_link_equal_the_channels_and_a_node_that_ignores_it_serves_on_the_channel():
    async with pair("take") as (client, server, origin):
        assert client.links_to(origin.peers["b"])  # the planner counts the link's per-token costs
        direct = await generate(client)
        assert client.tokens_over == {"direct": TOKENS, "channel": 0}, client.tokens_over
        assert client.links_to(origin.peers["b"])
        origin.peers["b"].advert = {}
        assert not client.links_to(origin.peers["b"])  # no API address: no link
        assert server.tokens_over == {"direct": TOKENS, "channel": 0}
        assert TENSOR_LINK in origin.peers["b"].sent
    async with pair("ignore") as (client, server, origin):
        assert await generate(client) == direct
        assert client.tokens_over == {"direct": 0, "channel": TOKENS}
        assert server.tokens_over == {"direct": 0, "channel": TOKENS}
        await generate(client)  # a link not taken is remembered: no new grant asked (the channel at once)
        assert client.tokens_over["channel"] == 2 * TOKENS
        assert origin.peers["b"].sent.count(TENSOR_LINK) == 1
        assert not client.links_to(origin.peers["b"])  # ...and the planner counts the channel's costs


async def test_a_link_cut_before_the_first_token_reopens_the_request_on_the_channel():
    async with pair("take") as (client, _, _):
        want = await generate(client)
    async with pair("cut") as (client, server, origin):
        assert await generate(client) == want
        assert client.tokens_over == {"direct": 0, "channel": TOKENS}, client.tokens_over
        sent = origin.peers["b"].sent
        assert sent.count(wire.OFFLOAD_OPEN) == 2 and wire.OFFLOAD_CANCEL in sent, sent
        await asyncio.sleep(0.1)
        assert server.tokens_over["direct"] == 0
