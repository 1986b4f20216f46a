"""The node service for offload and split: hosts stages and offloaded requests for peers, advertises what this
node offers, and owns the `Router` the API uses for its own requests.

`SplitService(node, mesh)` is a `mesh.node.Service` (start/stop/add_routes). It registers on the mesh:
`stage.open`/`stage.close` and `offload.*` control handlers, the `TENSOR` binary handler (tensor frames →
`StageHost.compute`), `tensor.link` (a grant for a direct tensor link, `mesh.tensor_link`, whose requests
the host's worker answers), and a peer listener that frees a departed peer's sequences. It publishes a `split`
field in this node's advert: {"serve_others", "memory_budget" (from the policy, less the spans in use here),
"catalog" (name → CID of the model files held here: `split.span_model`), "in_use" (the models loaded here,
which peers warm for: `split.warming`)}, plus `models`, `speed` and `shards` (the spans its stage host holds
loaded: `split.held_spans`).
Routes: `GET /v1/mesh/route` (the forced route, this node's advert fields and its `warming` state) and
`PUT /v1/mesh/route` (a forced route for tests and benchmarks: a body
`{"kind": "split", "stages": [{"peer": "local", "layers": "0:15"}, {"peer": ID, "layers": "15:30"}]}`, or
`{}` to go back to the scheduler).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
from aiohttp import web
from shoal.mesh.p2p.errors import MeshError, RemoteError
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.protocol import TENSOR, BinaryFrame, ControlFrame
from shoal.mesh.split import native, wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.held_spans import busy_bytes, offered_budget, shard_entries, span_bytes
from shoal.mesh.split.offload import OffloadClient
from shoal.mesh.split.offload_server import OffloadServer
from shoal.mesh.split.plan_inputs import ForcedRoute
from shoal.mesh.split.ports import MeshHandle, NodeView
from shoal.mesh.split.quota import PeerQuota
from shoal.mesh.split.receipts import UsageLedger
from shoal.mesh.split.remote_embed import EmbedServer
from shoal.mesh.split.router import STAGE_OVERHEAD, Router
from shoal.mesh.split.span_model import MAX_CATALOG
from shoal.mesh.split.speed_probe import SpeedProbe
from shoal.mesh.split.stage_host import StageHost
from shoal.mesh.split.stage_link import direct_host
from shoal.mesh.split.stage_receipts import StageReceipts
from shoal.mesh.split.tensor_link import TENSOR_LINK, LinkError, TensorLinkClient
from shoal.mesh.split.tensor_link_server import TensorLinkServer
from shoal.mesh.split.warming import Warming
from shoal.models.served import ServedModel
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage

logger = logging.getLogger(__name__)
CATALOG_REFRESH_S = 5.0
"""How often the advert loop re-reads the model catalog (files published or pulled outside a request)."""


class SplitService:
    def __init__(self, node: NodeView, mesh: MeshHandle) -> None:
        self.node = node
        self.mesh = mesh
        self.config: SplitConfig = node.config.split
        self.quota = PeerQuota(lambda: self.node.policy.max_tokens_per_peer_per_hour)
        """Tokens served per peer in the last hour, against `[policy] max_tokens_per_peer_per_hour`."""
        self.ledger = UsageLedger(mesh, Path(node.config.data_dir))
        """Usage receipts: issued for work this node served to peers, countersigned for work they served."""
        self._stage_paths: dict[tuple[str, LayerSpan], Path] = {}
        """The file each stage being built reads (for `stage_bytes`)."""
        self.host = StageHost(self._build_stage, self.refusal, max_sequences=self.config.max_sequences,
                              keep_idle_stages=self.config.keep_idle_stages, quota=self.quota,
                              ledger=self.ledger, sizer=self.stage_bytes, limit=self.stages_limit,
                              link_spin_s=self.config.link_spin_us / 1e6,
                              connect_next=self._connect_next if self.config.chain_stages else None,
                              native_lane=native.loaded if self.config.native_lane else lambda: None)
        node.models.hosted = lambda: busy_bytes(self.host.stages)  # the models' budget counts spans in use
        self.stage_receipts = StageReceipts(mesh, self.ledger)
        self.tensor_links = TensorLinkServer(self.host.serve_link, self.config)
        self.offload_server = OffloadServer(mesh, self._acquire, self.refusal,
                                            max_requests=self.config.max_offloads, ledger=self.ledger,
                                            model_id=lambda name: self.router.model_cid(name) or name,
                                            quota=self.quota, links=self.tensor_links,
                                            drain_timeout_s=self.config.offload_token_timeout_s)
        self.embed_server = EmbedServer(mesh, self._acquire, self.refusal,
                                        max_requests=self.config.max_offloads, quota=self.quota)
        self.offload_client = OffloadClient(mesh, open_timeout_s=self.config.offload_open_timeout_s,
                                            token_timeout_s=self.config.offload_token_timeout_s,
                                            ledger=self.ledger, settings=self.config)
        self.router = Router(node, mesh, self.host, self.offload_client, self.config, load=self.load,
                             stage_receipts=self.stage_receipts.sink)
        self.speed_probe = SpeedProbe(node.models, self.router.speeds, self.config.speed_probe_tokens,
                                      busy=self.load, on_done=self.publish_advert,
                                      every_s=self.config.speed_probe_every_min * 60.0)
        """Measures each model's speed once it loads (`[split] speed_probe`), polled by the advert loop."""
        self.warming = Warming(node, mesh, self.config, me=self.router.local_device,
                               budget=self.memory_budget, busy=self.load, refusal=self.refusal,
                               host_holds=self.host.holds, host_room=self.host.idle_room,
                               prepare=self.host.prepare, close_idle=self.host.close_idle,
                               span_models=self.router.span_models)
        """Prepares what peers' plans would likely ask of this node (`split.warming`), polled by the advert
        loop."""
        self._models: dict[str, Any] = {}
        self.stage_factory: Callable[[Path, LayerSpan], Stage] | None = None
        """Overrides how hosted spans are built from a GGUF path (the test harness shares dequantized weights
        this way)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._native_build: asyncio.Future[Any] | None = None
        """The native step lane's first build (`split.native`), in the background."""
        self._advert_task: asyncio.Task[None] | None = None
        mesh.on_control("stage.open", self._on_stage_open)
        mesh.on_control("stage.close", self._on_stage_close)
        mesh.on_binary(TENSOR, self._on_tensor)
        mesh.on_control(TENSOR_LINK, self._on_tensor_link)
        mesh.add_peer_listener(self._on_peer)

    # --- policy ---------------------------------------------------------------------------------------

    def refusal(self) -> str | None:
        """Why this node refuses work for peers right now, or None."""
        policy = self.node.policy
        if not policy.serve_others:
            return "this node does not serve other peers (policy serve_others is off)"
        if policy.metered:
            return "this node is on a metered link and serves no peers (policy metered)"
        try:
            battery = psutil.sensors_battery()
        except (OSError, RuntimeError, AttributeError):
            battery = None
        if battery is not None and not battery.power_plugged and battery.percent < policy.battery_floor:
            return f"battery at {battery.percent:.0f}% is below this node's floor of {policy.battery_floor}%"
        return None

    def memory_budget(self) -> int:
        """Bytes this node offers peers' plans: `min(available, max_memory_share × total, what [models]
        memory_budget_mb has left)`, the share and the models budget both less the spans in use on its stage
        host (idle ones count as free: `stages_limit` makes the host close them when room is needed)."""
        memory = psutil.virtual_memory()
        share = self.node.policy.max_memory_share * memory.total
        return offered_budget(memory.available, share, self.node.models.memory())

    def stages_limit(self) -> int:
        """Bytes the stages hosted here may hold together, idle ones included: `max_memory_share × total` and
        what [models] memory_budget_mb leaves after the loaded models, whichever is less."""
        memory = self.node.models.memory()
        share = self.node.policy.max_memory_share * psutil.virtual_memory().total
        return int(min(share, int(memory["budget"]) - int(memory["used"])))

    def stage_bytes(self, name: str, span: LayerSpan, stage: Stage) -> int:
        """Blocking: the bytes a stage just built from its file holds (`held_spans.span_bytes`)."""
        path = self._stage_paths.pop((name, span), None)
        return 0 if path is None else span_bytes(stage, path.stat().st_size, STAGE_OVERHEAD)

    def advert_fields(self) -> dict[str, Any]:
        budget = self.memory_budget()
        models = [m["id"] for m in self.node.models.list_models()]
        catalog = {}  # name -> CID of the complete files held here: members find a model's bytes by it
        for name in models[:MAX_CATALOG]:
            try:
                cid = self.node.models.resolve(name).cid
            except LookupError:
                continue
            if cid:
                catalog[name] = cid
        speed = {model: dict(entry) for model, entry in self.router.speeds.by_model.items()}  # copies: the
        # advert loop compares with the last fields it published
        return {"models": models, "speed": speed, "queue_depth": self.load(),
                "shards": shard_entries(self.host.stages, self.router.model_cid),
                "split": {"serve_others": self.refusal() is None, "memory_budget": budget,
                          "catalog": catalog, "in_use": self.node.models.loaded_names()[:MAX_CATALOG]}}

    def load(self) -> int:
        """Requests this node is busy with: its engines' live and waiting ones plus hosted sequences."""
        busy = self.host.sequences
        for name in self.node.models.loaded_names():
            served = self.node.models.served(name)
            if served is not None:
                busy += served.engine.active_count + served.engine.queue_depth
        return busy

    def publish_advert(self) -> None:
        self.mesh.gossip.update(**self.advert_fields())

    # --- mesh handlers --------------------------------------------------------------------------------

    async def _on_stage_open(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        return await self.host.open(peer.peer_id, frame.body)

    async def _on_stage_close(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        return await self.host.close(peer.peer_id, frame.body)

    async def _on_tensor(self, peer: Peer, frame: BinaryFrame) -> BinaryFrame | None:
        return await self.host.compute(peer.peer_id, frame)

    async def _on_tensor_link(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        reason = self.refusal()
        if reason is not None:
            raise RemoteError(wire.REFUSED, reason)
        try:  # {"for": "offload"}: a link for one offload's tokens, claimed by its `offload.open`
            return self.tensor_links.grant(peer.peer_id, park=frame.body.get("for") == "offload")
        except LinkError as exc:
            raise RemoteError("unavailable", str(exc)) from None

    async def _connect_next(self, peer_id: str) -> TensorLinkClient:
        """A direct tensor link to the next stage of a chain (`split.stage_chain`), asked for as an origin
        asks (`tensor.link` over the mesh's control channel); raises LinkError."""
        if not self.config.direct_tensors:
            raise LinkError("direct tensor links are off on this node")
        try:
            peer = self.mesh.peer(peer_id)
            host = direct_host(peer)
            if host is None:
                raise LinkError("the peer has no API address")
            grant = await peer.request(TENSOR_LINK, {}, self.config.control_timeout_s)
        except MeshError as exc:
            raise LinkError(f"no link grant: {exc}") from None
        settings = self.config
        connect = functools.partial(TensorLinkClient.connect, host, grant, settings.link_handshake_timeout_s,
                                    settings.link_record_timeout_s)
        return await asyncio.get_running_loop().run_in_executor(None, connect)

    def _on_peer(self, event: str, peer: Peer) -> None:
        if event == "left":
            self.tensor_links.drop_peer(peer.peer_id)
            self.mesh.spawn(self.host.peer_lost(peer.peer_id), name=f"free stages of {peer.peer_id[:12]}")

    # --- stages and models ----------------------------------------------------------------------------

    async def _acquire(self, name: str) -> ServedModel:
        return await self.node.models.acquire(name)

    def _model_path(self, name: str, span: LayerSpan, cid: str | None) -> Path:
        """Blocking: the GGUF holding `span` of `name` — the local file, or (not held here, CID known) a
        sparse file with only the header and the span's tensors, fetched over IPFS ranged reads."""
        try:
            return Path(self.node.models.resolve(name).path)  # ModelNotFoundError is a LookupError
        except LookupError:
            if not cid or self._loop is None:
                raise
        logger.info("fetching layers %s of %s (%s) over IPFS", span, name, cid)
        future = asyncio.run_coroutine_threadsafe(self.node.ipfs.pull_span(cid, span), self._loop)
        try:
            return Path(future.result(self.config.span_fetch_timeout_s))
        except TimeoutError:
            future.cancel()
            limit = self.config.span_fetch_timeout_s
            raise LookupError(f"fetching layers {span} of {cid} took over {limit:.0f} s") from None
        except Exception as exc:  # the IPFS layer's own errors: report as "cannot find the model"
            raise LookupError(f"cannot fetch layers {span} of {cid}: {exc}") from exc

    def _build_stage(self, name: str, span: LayerSpan, cid: str | None = None) -> Stage:
        """Blocking: open the model file (once) and build the span's stage with the node's backend."""
        path = self._model_path(name, span, cid)
        self._stage_paths[(name, span)] = path
        if self.stage_factory is not None:
            return self.stage_factory(path, span)
        loaded = self._models.get(str(path))
        if loaded is None:
            from shoal.models.loader import open_model

            loaded = self._models[str(path)] = open_model(path)
        from shoal.models.loader import build_stage

        config = self.node.config.models
        pool = {"max_total_tokens": config.cache_tokens} if config.backend == "tvm" else {}  # KV pool size
        return build_stage(loaded, span, backend=config.backend, target=config.target,
                           cache_dir=self.node.models.cache_dir, **pool)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.stage_receipts.start()
        if self.config.native_lane and self.config.direct_tensors:  # built once per machine, ~1 s
            self._native_build = self._loop.run_in_executor(None, native.steplane,
                                                            self.node.config.compile_dir)
        try:
            if self.config.direct_tensors:
                self.tensor_links.start(self.node.host)
        except OSError as exc:  # the API's address cannot take a second listener: tensors use the channel
            logger.warning("no direct tensor links on %s: %s", self.node.host, exc)
        self.publish_advert()
        self._advert_task = asyncio.create_task(self._refresh_adverts(), name="split-adverts")

    async def _refresh_adverts(self) -> None:
        previous: dict[str, Any] = {}
        next_catalog = 0.0
        while True:
            if time.monotonic() >= next_catalog:  # files published or pulled since: advertise them too
                next_catalog = time.monotonic() + CATALOG_REFRESH_S
                try:
                    await self.node.models.refresh_async()
                except Exception:  # the loop's boundary: a bad catalog file must not stop the adverts
                    logger.exception("cannot re-read the model catalog")
            if self.config.speed_probe:
                self.speed_probe.poll()
            self.warming.poll()
            try:  # idle stages past what the budget leaves them now (a model loaded, the policy lowered)
                await self.host.trim_to(self.stages_limit())
            except Exception:  # the loop's boundary: a stage that fails to close must not stop the adverts
                logger.exception("cannot close idle stages")
            fields = self.advert_fields()
            fields["split"]["memory_budget"] = fields["split"]["memory_budget"] >> 24 << 24  # change ≥ 16 MiB
            if fields != previous:
                self.publish_advert()
                previous = fields
            await asyncio.sleep(self.config.advert_refresh_s)

    async def stop(self) -> None:
        if self._advert_task is not None:
            self._advert_task.cancel()
            await asyncio.gather(self._advert_task, return_exceptions=True)
            self._advert_task = None
        await self.speed_probe.stop()
        await self.warming.stop()
        if self.router.standby is not None:
            await self.router.standby.stop()
        await self.offload_server.stop()
        self.tensor_links.stop()
        await self.host.stop()

    def add_routes(self, app: web.Application) -> None:
        async def get_route(request: web.Request) -> web.Response:
            forced = self.router.forced
            body = None if forced is None else {
                "kind": forced.kind, "stages": [{"peer": p, "layers": s} for p, s in forced.stages]}
            offload_tokens = {"received": dict(self.offload_client.tokens_over),
                              "sent": dict(self.offload_server.tokens_over)}
            lane = native.status() if self.config.native_lane else "off: [split] native_lane = false"
            stage_steps = {"computed": self.host.calls, "native": self.host.lane_steps, "native_lane": lane}
            return web.json_response({"forced": body, "advert": self.advert_fields(),
                                      "warming": self.warming.view(), "offload_tokens": offload_tokens,
                                      "stage_steps": stage_steps}, dumps=_dumps)

        async def put_route(request: web.Request) -> web.Response:
            try:
                self.router.force(ForcedRoute.from_body(await request.json()))
            except ValueError as exc:
                return web.json_response({"error": {"message": str(exc), "type": "invalid_request_error",
                                                    "param": None, "code": "bad_route"}}, status=400)
            if self.router.forced is not None:
                logger.warning("node-wide forced route set (for tests and benchmarks): %s %s; every "
                               "request without its own route follows it", self.router.forced.kind,
                               list(self.router.forced.stages))
            else:
                logger.info("node-wide forced route cleared: the scheduler plans again")
            return await get_route(request)

        async def get_usage(request: web.Request) -> web.Response:
            return web.json_response(await self.ledger.view(), dumps=_dumps)

        app.router.add_get("/v1/mesh/usage", get_usage)
        app.router.add_get("/v1/mesh/route", get_route)
        app.router.add_put("/v1/mesh/route", put_route)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
