"""A full node process for split/offload tests and benchmarks: the node `shoal node` runs (`mesh.node.Node`
with the mesh and split services), configured by a config TOML like any node, plus what only tests need.

    python -m tests.mesh.split_harness --config FILE [--no-model] [--delay-ms N] [--trace FILE]
        [--switch-interval-ms MS] [--stage-delay-s S] [-v]

Every node setting (API address and key, policy, `[mesh]` secret/allow/bootstrap/timing, `[models]` backend,
`[split]`) comes from the file, which `tests.mesh.split_nodes.SplitNode` writes (`tests.nodes.NodeProcess`).
The flags are test and bench instruments only. Prints one JSON line `{"ready": true, "id": ..., "api":
"host:port"}` on stdout once the default model is loaded. With the NumPy backend, the node's engine and the
spans it hosts share one cache of dequantized tensors (one process holds the fp32 model once); test-only
routes (`/test/control`, `/test/tensor`) send raw frames to a peer. `--no-model` removes the model from the
catalog after start (a node that does not hold it). `--trace FILE` appends one JSON line per hop event of the
split decode path (`[event, key, perf_counter]`; CLOCK_MONOTONIC, so comparable across processes) for
bench/split.py --trace. `--stage-delay-s S` (NumPy backend) makes every hosted span take S seconds longer to
build, and every model load too (an injected slow load, as a compile on a cold cache would be).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from shoal.mesh.node.config import ConfigError, load_config
from shoal.mesh.node.node import Node
from shoal.mesh.p2p.errors import MeshError, RemoteError
from shoal.mesh.p2p.protocol import TENSOR
from shoal.mesh.p2p.service import MeshService
from shoal.mesh.split.service import SplitService
from shoal.models.served import ServedModel
from shoal.models.span import LayerSpan

from tests.mesh.tensor_frames import reply_fields


class _Weights:
    """Opened GGUF files and their dequantized tensors, shared by the engine and the hosted spans."""

    def __init__(self) -> None:
        self.models: dict[Path, Any] = {}

    def model(self, path: Path) -> Any:
        from shoal.models.gguf import GGUFModel

        if path not in self.models:
            gguf = GGUFModel.open(path)
            gguf.load = functools.cache(gguf.dequantize)  # type: ignore[attr-defined]
            self.models[path] = gguf
        return self.models[path]

    def stage(self, path: Path, span: LayerSpan) -> Any:
        from shoal.models.reference import ReferenceStage

        gguf = self.model(path)
        return ReferenceStage(gguf, span, load=gguf.load)


def numpy_load_fn(weights: _Weights) -> Any:
    def load(model: Any, options: Any, *rest: Any) -> ServedModel:
        from shoal.models.embeddings import Embedder
        from shoal.models.generate import Engine
        from shoal.models.tokenizer import Tokenizer

        gguf = weights.model(Path(model.path))
        stage = weights.stage(Path(model.path), LayerSpan.whole(gguf.config.num_layers))
        tokenizer = Tokenizer.from_gguf(gguf)
        engine = Engine([stage], tokenizer, max_batch=getattr(options, "max_batch", 8))
        return ServedModel(name=model.name, tokenizer=tokenizer, engine=engine,
                           context_length=gguf.config.context_length, stages=[stage], backend="numpy",
                           embedder=Embedder(model.path, gguf.config.context_length))  # as a node's

    return load


class _TestRoutes:
    """Test-only routes: make this node send a control request or a raw tensor frame to a peer."""

    def __init__(self, mesh: MeshService) -> None:
        self.mesh = mesh

    async def control(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            reply = await self.mesh.request(body["peer"], body["type"], body.get("body", {}), 30.0)
        except RemoteError as exc:
            return _json({"error": {"code": exc.code, "message": exc.message}})
        except MeshError as exc:
            return _json({"error": {"code": type(exc).__name__, "message": str(exc)}}, 502)
        return _json({"reply": reply})

    async def tensor(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            reply = await self.mesh.peer(body["peer"]).request_binary(
                TENSOR, {}, bytes.fromhex(body.get("payload", "")), 30.0)
        except MeshError as exc:
            return _json({"error": {"code": type(exc).__name__, "message": str(exc)}}, 502)
        return _json({"reply": reply_fields(reply.payload), "bytes": len(reply.payload)})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/test/control", self.control)
        app.router.add_post("/test/tensor", self.tensor)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def install_trace(path: str) -> None:
    """Bench-only: record when each decode step passes each hop of the split path, as JSON lines
    `[event, perf_counter]` (CLOCK_MONOTONIC: comparable across the node processes on one machine)."""
    import gc
    import time

    from shoal.mesh.p2p.peer import Peer
    from shoal.mesh.split import hosted, remote_stage, stage_chain, stage_host, tensor_link
    from shoal.models.chain import StageChain

    out = open(path, "a", buffering=1)  # lives as long as the process
    clock = time.perf_counter

    def emit(event: str) -> None:
        out.write(f'["{event}", {clock()!r}]\n')  # one write per line: no lock needed for whole lines

    def wrap_async(cls: Any, name: str, before: str | None, after: str | None,
                   when: Callable[..., bool] = lambda *a: True) -> None:
        original = getattr(cls, name)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            traced = when(*args)
            if traced and before:
                emit(before)
            try:
                return await original(*args, **kwargs)
            finally:
                if traced and after:
                    emit(after)

        setattr(cls, name, wrapper)

    def wrap_sync(cls: Any, name: str, before: str, after: str, when: Callable[..., bool] = lambda *a: True
                  ) -> None:
        original = cls.__dict__[name]
        func = original.__func__ if isinstance(original, classmethod | staticmethod) else original

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            traced = when(*args)
            if traced:
                emit(before)
            try:
                return func(*args, **kwargs)
            finally:
                if traced:
                    emit(after)

        setattr(cls, name, type(original)(wrapper) if isinstance(original, classmethod | staticmethod)
                else wrapper)

    def is_tensor_request(peer: Peer, kind: int, *rest: Any) -> bool:
        return kind == TENSOR

    def mine(peer: Peer, frame: Any) -> bool:
        return frame.request_id % 2 == (1 if peer.offerer else 0)

    original_on_binary = Peer._on_binary

    def on_binary(self: Peer, frame: Any) -> None:
        if frame.kind == TENSOR:
            emit("o.reply_arrived" if mine(self, frame) else "p.arrived")
        original_on_binary(self, frame)

    Peer._on_binary = on_binary  # type: ignore[method-assign]
    wrap_async(Peer, "request_binary", "o.loop_start", "o.loop_end", is_tensor_request)
    wrap_async(Peer, "send_binary", None, "o.sent",
               lambda peer, frame: frame.kind == TENSOR and mine(peer, frame))
    wrap_async(Peer, "send_binary", None, "p.sent",
               lambda peer, frame: frame.kind == TENSOR and not mine(peer, frame))
    wrap_async(stage_host.StageHost, "compute", "p.handler_start", "p.handler_end")
    wrap_sync(stage_host.StageHost, "_timed_forward", "p.exec_start", "p.exec_end")
    wrap_sync(hosted.DirectStage, "decode", "o.local_start", "o.local_end")
    wrap_sync(remote_stage.RemoteStage, "_forward", "o.stage_start", "o.stage_end")
    wrap_sync(tensor_link.TensorLinkClient, "call", "o.direct_start", "o.direct_end")
    wrap_sync(stage_host.StageHost, "_link_frame", "p.direct_start", "p.direct_end")
    wrap_sync(stage_host.StageHost, "_lane_step", "p.direct_start", "p.direct_end")  # the native step lane's
    wrap_sync(stage_chain.NextLinks, "send", "p.pass_start", "p.pass_end")  # a chain's hop to the next stage
    wrap_sync(stage_chain.NextLinks, "send_native", "p.pass_start", "p.pass_end")
    wrap_sync(remote_stage.RemoteStage, "decode_through", "o.chain_start", "o.chain_end")
    # a decode step on the engine's thread (steps run back to back there: models/generate.py)
    wrap_sync(StageChain, "decode", "e.step_start", "e.step_end")

    def on_gc(phase: str, info: dict[str, int]) -> None:  # the cyclic collector's pauses, any thread
        emit(f"gc{info['generation']}.start" if phase == "start" else "gc.stop")

    gc.callbacks.append(on_gc)


def deliver_at_once() -> None:
    """Bench A/B only: the engine posts each decode step's tokens at once, as before `models.idle` (not while
    the next step waits on a peer)."""
    from shoal.models import idle

    def at_once(work: Callable[[], None]) -> None:
        idle.flush()
        work()

    idle.defer = at_once  # type: ignore[assignment]


def delay_tensor_links(seconds: float) -> None:
    """Bench-only: hold every record a direct tensor link sends (both ends) for `seconds` first, as
    `delay_outgoing_datagrams` holds the data channels' packets (a blocking sleep: the sender would wait for
    the answer anyway)."""
    import time

    from shoal.mesh.split import remote_stage, tensor_link, tensor_link_server

    def delayed(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return original(*args, **kwargs)

        return wrapper

    tensor_link.TensorLinkClient.call = delayed(tensor_link.TensorLinkClient.call)  # type: ignore[method-assign]
    tensor_link.TensorLinkClient.send = delayed(tensor_link.TensorLinkClient.send)  # type: ignore[method-assign]
    remote_stage.call_chain = delayed(remote_stage.call_chain)  # a chain's first hop
    tensor_link_server.ServerLink.send_frame = delayed(  # type: ignore[method-assign]
        tensor_link_server.ServerLink.send_frame)


def slow_stages(build: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """Test-only fault: building a hosted span (or loading a model) takes `seconds` longer (a blocking sleep
    on the loading thread, as a compile would hold it)."""
    import time

    def slow(*args: Any) -> Any:
        time.sleep(seconds)
        return build(*args)

    return slow


async def serve(args: argparse.Namespace) -> None:
    try:
        config = load_config(Path(args.config))
    except ConfigError as exc:
        raise SystemExit(f"split_harness: {exc}") from None
    if args.no_model:
        config = replace(config, models=replace(config.models, preload=False))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"%(asctime)s {config.name} %(levelname)s %(name)s: %(message)s",
    )
    if args.switch_interval_ms is not None:  # bench A/B only: measured no gain (docs/split.md)
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.trace:
        install_trace(args.trace)
    if args.deliver_at_once:
        deliver_at_once()
    if args.delay_ms:
        from shoal.mesh.p2p.ice import delay_outgoing_datagrams

        delay_outgoing_datagrams(args.delay_ms / 1000)  # emulated link latency (this kernel has no netem)
        delay_tensor_links(args.delay_ms / 1000)
    numpy = config.models.backend == "numpy"
    weights = _Weights()
    kwargs: dict[str, Any] = {"load_fn": numpy_load_fn(weights)} if numpy else {}
    if numpy and args.stage_delay_s:
        kwargs["load_fn"] = slow_stages(kwargs["load_fn"], args.stage_delay_s)
    node = Node(config, **kwargs)
    mesh = node.mesh  # the node owns its mesh service (configured from `[mesh]`)
    split = SplitService(node, mesh)
    if numpy:
        split.stage_factory = weights.stage
        if args.stage_delay_s:
            split.stage_factory = slow_stages(weights.stage, args.stage_delay_s)
    node.services.extend([split, _TestRoutes(mesh)])
    node.use_router(split.router)
    await node.start()
    if args.no_model:
        node.models._models.clear()  # test-only: this node holds no model
    else:
        await node.wait_ready()
    split.publish_advert()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = {"ready": True, "id": node.id, "api": f"{node.host}:{node.port}"}
    print(orjson.dumps(ready).decode(), flush=True)
    try:
        await stop.wait()
    finally:
        await node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mesh.split_harness")
    parser.add_argument("--config", required=True, help="the node's config TOML (every node setting)")
    parser.add_argument("--no-model", action="store_true", help="test-only: drop the model after start")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="hold every outgoing datagram this long")
    parser.add_argument("--trace", help="append hop timings of split decode steps to this file (bench)")
    parser.add_argument("--deliver-at-once", action="store_true",
                        help="bench A/B: post each step's tokens at once, not while the next step waits")
    parser.add_argument("--switch-interval-ms", type=float,
                        help="set the GIL switch interval (bench A/B; default: CPython's 5 ms)")
    parser.add_argument("--stage-delay-s", type=float, default=0.0,
                        help="test-only: building each hosted span, and loading each model, takes this "
                        "much longer")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
