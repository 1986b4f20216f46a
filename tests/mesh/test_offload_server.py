"""`OffloadServer` over a real `Engine` (NumPy reference stage): `offload.open` leaves the prompt's ids and
the context limit to the engine — the one place that checks them — and answers a refusal before any work
(a grammar constraint that does not compile included). `EmbedServer` refuses malformed or oversized
`offload.embed` bodies before any work; embedding vectors cross the wire checked."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from shoal.mesh.p2p.errors import RemoteError
from shoal.mesh.p2p.protocol import ControlFrame
from shoal.mesh.split import wire
from shoal.mesh.split.offload_server import OffloadServer
from shoal.models.generate import Engine
from shoal.models.served import ServedModel

from tests.models.shared_model import chat_ids, reference_stage, tokenizer

MODEL = "smollm2-135m-instruct"


class FakeMesh:
    """The handlers `OffloadServer` registers, and the tasks it spawns."""

    def __init__(self) -> None:
        self.control: dict[str, Any] = {}
        self.tasks: list[asyncio.Task[Any]] = []

    def on_control(self, frame_type: str, handler: Any) -> None:
        self.control[frame_type] = handler

    def add_peer_listener(self, listener: Any) -> None:
        return None

    def spawn(self, coro: Any, name: str = "mesh") -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.append(task)
        return task


class FakePeer:
    peer_id = "origin-peer"

    def __init__(self) -> None:
        self.frames: list[tuple[str, dict[str, Any]]] = []
        self.finished = asyncio.Event()

    async def notify(self, frame_type: str, body: dict[str, Any]) -> None:
        self.frames.append((frame_type, body))
        if frame_type in (wire.OFFLOAD_DONE, wire.OFFLOAD_ERROR):
            self.finished.set()


@contextlib.asynccontextmanager
async def serving(max_context: int) -> AsyncIterator[tuple[Engine, FakeMesh, OffloadServer]]:
    """An offload server on a real engine (the NumPy reference of the embedded model, all 30 layers)."""
    stage = reference_stage(0, 30)
    async with Engine([stage], tokenizer(), max_context=max_context) as engine:
        served = ServedModel(name=MODEL, tokenizer=tokenizer(), engine=engine,
                             context_length=engine.max_context, stages=[stage], backend="numpy")

        async def acquire(name: str) -> ServedModel:
            return served

        mesh = FakeMesh()
        yield engine, mesh, OffloadServer(mesh, acquire, lambda: None)  # type: ignore[arg-type]


async def test_offload_open_leaves_ids_and_context_to_the_engine() -> None:
    async with serving(max_context=64) as (engine, mesh, server):
        open_request = mesh.control[wire.OFFLOAD_OPEN]
        peer = FakePeer()
        prompt = chat_ids("What is the capital of France?")
        room = engine.max_context - len(prompt)

        def frame(rid: int, ids: list[int], max_tokens: int) -> ControlFrame:
            body = {"rid": rid, "model": MODEL, "prompt_ids": ids,
                    "params": {"temperature": 0, "max_tokens": max_tokens}}
            return ControlFrame(wire.OFFLOAD_OPEN, body)

        with pytest.raises(RemoteError) as too_long:
            await open_request(peer, frame(1, prompt, room + 1))
        assert too_long.value.code == wire.BAD_REQUEST and "exceeds the context" in too_long.value.message
        with pytest.raises(RemoteError) as bad_id:
            await open_request(peer, frame(2, [*prompt[:-1], 10**6], 4))
        assert bad_id.value.code == wire.BAD_REQUEST and "token ids" in bad_id.value.message
        bad_schema = frame(4, prompt, 4)
        bad_schema.body["params"]["constraint"] = {"kind": "json_schema", "spec": '{"type": "object", '
                                                                                 '"properties": 5}'}
        with pytest.raises(RemoteError) as bad_grammar:
            await open_request(peer, bad_schema)
        assert bad_grammar.value.code == wire.BAD_REQUEST and "schema" in bad_grammar.value.message
        assert mesh.tasks == [] and engine.kv_reserved == 0  # refused before any work

        assert await open_request(peer, frame(3, prompt, room)) == {"accepted": True, "link": False}
        await asyncio.wait_for(peer.finished.wait(), 120)
        tokens = [body for kind, body in peer.frames if kind == wire.OFFLOAD_TOKEN]
        assert peer.frames[-1] == (wire.OFFLOAD_DONE, {"rid": 3})
        assert [t["index"] for t in tokens] == list(range(len(tokens))) and 0 < len(tokens) <= room
        await server.stop()


class LaggingPeer(FakePeer):
    """A sender that falls behind: each frame takes `lag_s` to go out (a busy loop, a loaded machine)."""

    def __init__(self, lag_s: float) -> None:
        super().__init__()
        self.lag_s = lag_s

    async def notify(self, frame_type: str, body: dict[str, Any]) -> None:
        await asyncio.sleep(self.lag_s)
        await super().notify(frame_type, body)


async def test_a_sender_behind_sends_the_tokens_produced_meanwhile_in_one_frame() -> None:
    from shoal.mesh.split.offload_frames import token_events

    async with serving(max_context=96) as (_, mesh, server):
        prompt = chat_ids("Write a long story about a lighthouse keeper.")

        async def run(rid: int, **extra: Any) -> list[dict[str, Any]]:
            peer = LaggingPeer(0.2)
            body = {"rid": rid, "model": MODEL, "prompt_ids": prompt,
                    "params": {"temperature": 0, "max_tokens": 12}, **extra}
            assert await mesh.control[wire.OFFLOAD_OPEN](peer, ControlFrame(wire.OFFLOAD_OPEN, body)) == \
                {"accepted": True, "link": False}
            await asyncio.wait_for(peer.finished.wait(), 120)
            assert peer.frames[-1] == (wire.OFFLOAD_DONE, {"rid": rid})
            return [b for kind, b in peer.frames if kind == wire.OFFLOAD_TOKEN]

        single = await run(1)  # an origin that did not ask: one frame per token, however late
        assert len(single) >= 6 and all("more" not in f for f in single)
        frames = await run(2, coalesce=True)
        assert len(frames) < len(single) and any(f.get("more") for f in frames)  # made during each lag
        assert all(f["rid"] == 2 for f in frames)
        events, index = [], 0
        for f in frames:
            got = token_events(f, index)
            assert got is not None
            events += got
            index += len(got)
        want = [e for f in single for e in token_events(f, f["index"]) or []]
        assert events == want  # the same tokens, indexes and finish
        assert events[-1].finish_reason is not None and events[-1].completion_tokens == len(single)
        await server.stop()


def test_logprobs_cross_the_wire_checked() -> None:
    import orjson
    from shoal.models.requests import EventLogprobs, TokenLogprob

    chosen = TokenLogprob(7, "é", "é".encode(), -0.25)
    found = EventLogprobs(chosen, (chosen, TokenLogprob(9, "\ufffd", b"\xc3", -float("inf"))))
    back = wire.decode_logprobs(orjson.loads(orjson.dumps(wire.encode_logprobs(found))))
    assert back.chosen == found.chosen and back.top[1].bytes == b"\xc3" and back.top[1].logprob == -9999.0
    for bad in ({"chosen": [1, "!!", -1.0]}, {"chosen": [1, "", 0.5]}, {"chosen": [-1, "", -1.0]},
                {"chosen": [1, "", -1.0], "top": [[1, "", -1.0]] * 21}, [], {"chosen": [1, "", True]}):
        with pytest.raises(ValueError):
            wire.decode_logprobs(bad)


async def test_embed_server_refuses_before_any_work() -> None:
    from shoal.mesh.split.remote_embed import EmbedServer

    stage = reference_stage(0, 30)
    served = ServedModel(name=MODEL, tokenizer=tokenizer(), engine=None,  # type: ignore[arg-type]
                         context_length=64, stages=[stage], backend="numpy")  # no embedder

    async def acquire(name: str) -> ServedModel:
        if name != MODEL:
            raise LookupError(f"no model {name}")
        return served

    mesh = FakeMesh()
    EmbedServer(mesh, acquire, lambda: None)  # type: ignore[arg-type]
    embed = mesh.control[wire.OFFLOAD_EMBED]
    cases = [({"inputs": [[1]]}, wire.BAD_REQUEST), ({"model": MODEL, "inputs": []}, wire.BAD_REQUEST),
             ({"model": MODEL, "inputs": [[1, "2"]]}, wire.BAD_REQUEST),
             ({"model": MODEL, "inputs": [[1]] * (wire.MAX_EMBED_INPUTS + 1)}, wire.BAD_REQUEST),
             ({"model": MODEL, "inputs": [[1] * 9000, [1] * 9000]}, wire.BAD_REQUEST),
             ({"model": "other", "inputs": [[1]]}, wire.NO_MODEL),
             ({"model": MODEL, "inputs": [[1]]}, wire.NO_MODEL)]  # loaded without an embedder
    for body, code in cases:
        with pytest.raises(RemoteError) as err:
            await embed(FakePeer(), ControlFrame(wire.OFFLOAD_EMBED, body))
        assert err.value.code == code, (body, err.value)
    refusing = FakeMesh()
    EmbedServer(refusing, acquire, lambda: "not serving others")  # type: ignore[arg-type]
    with pytest.raises(RemoteError) as refused:
        await refusing.control[wire.OFFLOAD_EMBED](FakePeer(), ControlFrame(wire.OFFLOAD_EMBED, {}))
    assert refused.value.code == wire.REFUSED


def test_embedding_vectors_cross_the_wire_checked() -> None:
    import numpy as np

    vector = np.linspace(-1, 1, 576, dtype=np.float32)
    assert np.array_equal(wire.decode_vector(wire.encode_vector(vector), 576), vector)
    assert wire.embed_batch(576) >= 16 and wire.embed_batch(1 << 20) == 0
    nan = vector.copy()
    nan[3] = np.nan
    for bad, dim in ((wire.encode_vector(vector), 575), (wire.encode_vector(nan), 576), ("!" * 3072, 576),
                     (5, 576)):
        with pytest.raises(ValueError):
            wire.decode_vector(bad, dim)


async def test_a_remote_model_samples_with_the_peers_defaults() -> None:
    """`offload.info` carries the model's own sampling defaults, so a request that leaves temperature out
    samples the same through a node that does not hold the model; malformed defaults skip that peer."""
    from shoal.mesh.split.remote_model import find_remote_model

    stage = reference_stage(0, 30)
    served = ServedModel(name=MODEL, tokenizer=tokenizer(), engine=None,  # type: ignore[arg-type]
                         context_length=64, stages=[stage], backend="numpy",
                         sampling_defaults={"temperature": 0.6, "top_k": 40})

    async def acquire(name: str) -> ServedModel:
        return served

    mesh = FakeMesh()
    OffloadServer(mesh, acquire, lambda: None)  # type: ignore[arg-type]
    tamper: dict[str, Any] = {}

    class Link(FakeMesh):  # the origin's side: each request answered by the server's handler
        async def request(self, peer_id: str, frame_type: str, body: dict[str, Any],
                          timeout_s: float | None = None) -> dict[str, Any]:
            reply = await mesh.control[frame_type](FakePeer(), ControlFrame(frame_type, body))
            return {**reply, **tamper.get(peer_id, {})}

    remote = await find_remote_model(Link(), MODEL, ["good"])  # type: ignore[arg-type]
    assert remote is not None and dict(remote.sampling_defaults) == {"temperature": 0.6, "top_k": 40}
    tamper.update({"bad": {"sampling_defaults": {"temperature": 9.0}},
                   "odd": {"sampling_defaults": {"logit_bias": 1}}})
    remote = await find_remote_model(Link(), MODEL, ["bad", "odd", "good"])  # type: ignore[arg-type]
    assert remote is not None and remote.peer_id == "good"


async def test_a_model_with_no_room_here_is_a_busy_refusal_not_an_internal_error() -> None:
    """A peer whose memory budget (or free memory) cannot take the model answers `busy`: the origin re-plans
    elsewhere (an `internal` error would end the client's request)."""
    from shoal.models.errors import InsufficientMemoryError, ModelMemoryBudgetError

    for error in (ModelMemoryBudgetError("needs 600 MiB; budget 512 MiB", retryable=True),
                  InsufficientMemoryError("needs 600 MiB; 100 MiB free")):
        async def acquire(name: str, error: Exception = error) -> ServedModel:
            raise error

        mesh = FakeMesh()
        OffloadServer(mesh, acquire, lambda: None)  # type: ignore[arg-type]
        body = {"rid": 1, "model": MODEL, "prompt_ids": [1, 2, 3], "params": {"temperature": 0}}
        for frame_type, frame_body in ((wire.OFFLOAD_OPEN, body), (wire.OFFLOAD_INFO, {"model": MODEL})):
            with pytest.raises(RemoteError) as refused:
                await mesh.control[frame_type](FakePeer(), ControlFrame(frame_type, frame_body))
            assert refused.value.code == wire.BUSY and "MiB" in refused.value.message
        assert mesh.tasks == []
