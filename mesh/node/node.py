"""A shoal node: wires config, event bus, models, the HTTP API and the subsystems' services together.

A subsystem plugs in as a `Service` (`start()`, `stop()`, `add_routes(app)`); the node starts them in order
before the preload of the default model and stops them in reverse after the API has drained.
`serve_until_signalled` runs a node in the foreground until SIGINT/SIGTERM, then shuts down gracefully: stop
accepting, let in-flight streams finish (up to `[api] shutdown_grace_s`), cancel the rest cleanly, release the
port. `build_node` is the node `shoal node` runs (IPFS, mesh, offload/split routing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any, Protocol

from aiohttp import web
from shoal.mesh.api.app import create_app
from shoal.mesh.api.metrics import NodeMetrics
from shoal.mesh.api.ports import RouterPort
from shoal.mesh.api.server import api_runner
from shoal.mesh.events import EventBus
from shoal.mesh.ipfs.block_exchange import BlockExchange
from shoal.mesh.ipfs.errors import InvalidCidError, IpfsError, UnknownModelError
from shoal.mesh.ipfs.service import IpfsService
from shoal.mesh.node.config import NodeConfig, PolicyConfig
from shoal.mesh.node.data_dir import DataDirLock
from shoal.mesh.node.logging_bridge import LogBridge
from shoal.mesh.node.model_manager import LoadFn, ModelManager, ServingLimits, load_engine
from shoal.mesh.node.request_log import RequestLog
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.p2p.service import MeshService
from shoal.mesh.split.span_model import cid_in_adverts
from shoal.mesh.version import shoal_version
from shoal.models.embedded import DEFAULT_MODEL_NAME

logger = logging.getLogger(__name__)


class Service(Protocol):
    """A node subsystem (IPFS, mesh): lifecycle plus the HTTP routes it owns."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def add_routes(self, app: web.Application) -> None: ...


def _peer_address(host: str, port: int) -> str | None:
    """`host:port` peers can use for this node's API (None for a wildcard host or port 0: use
    `[mesh] advertise`)."""
    if port == 0 or host in ("0.0.0.0", "::", ""):
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Node:
    """One node. `await start()` listens on `[api]`; `await stop()` is idempotent."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        load_fn: LoadFn = load_engine,
    ) -> None:
        config.api.check_exposure()
        self.config = config
        self.version = shoal_version()
        self.bus = EventBus()
        self.ipfs = IpfsService(config.ipfs, config.data_dir, self.bus)
        self.requests = RequestLog(self.bus, config.api.request_log_size)
        self.mesh = MeshService(
            config.mesh,
            None,
            config.data_dir,
            self.bus,
            api_address=_peer_address(config.api.host, config.api.port),
            pipelines=self.requests.pipelines,
        )
        self.blocks = BlockExchange(self.mesh, self.ipfs.store)
        self.ipfs.add_source(self.blocks.source())
        self.ipfs.set_mesh_names(self._mesh_cid)  # pull by name: names this node lacks, from the mesh's
        self.metrics = NodeMetrics()
        self.log_bridge = LogBridge(self.bus, config.api.log_buffer_size)
        cache_dir = config.compile_dir
        budget_mb = config.models.memory_budget_mb
        self.models = ModelManager(
            self.bus,
            backend=config.models.backend,
            target=config.models.target,
            cache_dir=cache_dir,
            max_batch=config.models.max_batch,
            limits=ServingLimits.from_config(config.models),
            load_fn=load_fn,
            catalog=self.ipfs.list_models,
            memory_budget=None if budget_mb is None else budget_mb << 20,
            keep_alive_s=config.models.keep_alive_s,
            keep_loaded=config.models.default if config.models.keep_default_loaded else None,
        )
        self.policy: PolicyConfig = config.policy
        self.services: list[Service] = [self.ipfs, self.mesh]
        self.router: RouterPort | None = None
        """Set with `use_router` (`build_node` hands it the split service's): completions then stream through
        `router.stream(served, prompt_ids, params, route)` (local, offload or split); None streams from the
        local engine."""
        self.identity: Identity | None = None
        self.started: float | None = None
        self.draining = False
        self.host = config.api.host
        self.port = config.api.port
        self._runner: web.AppRunner | None = None
        self._preload: asyncio.Task[Any] | None = None
        self._watch: asyncio.Task[Any] | None = None
        self._started_services: list[Service] = []
        self._stopped = False
        self._dir_lock = DataDirLock(config.data_dir)
        """One node per data dir (taken first in `start`, released last in `stop`)."""

    # --- identity and description --------------------------------------------------------------------

    def _mesh_cid(self, name: str) -> str | None:
        """The CID the connected members' catalogs give `name` (most of them), or None."""
        return cid_in_adverts(name, [peer.advert or {} for peer in self.mesh.connected_peers()])

    @property
    def id(self) -> str:
        return self.identity.peer_id if self.identity else ""

    @property
    def name(self) -> str:
        return self.identity.name if self.identity else self.config.name

    @property
    def api_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _compile_target(self) -> str:
        """What this node compiles for: the loaded models' target kinds, else the configured choice."""
        if self.config.models.backend == "numpy":
            return "numpy"
        return ",".join(self.models.compiled_targets()) or self.config.models.target or "auto"

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "target": self._compile_target(),
            "backend": self.config.models.backend,
            "api": self.api_url,
            "data_dir": str(self.config.data_dir),
            "started": self.started,
            "policy": self.policy.to_dict(),
        }

    def set_policy(self, changes: dict[str, Any]) -> PolicyConfig:
        """Apply a partial policy update (ConfigError on bad keys/values) and announce it."""
        self.policy = self.policy.updated(changes)
        self.bus.publish("policy.changed", policy=self.policy.to_dict())
        logger.info("policy changed: %s", self.policy)
        return self.policy

    def use_router(self, router: RouterPort) -> None:
        """Route completions through `router` (before `start()`: the app is handed it when it is built)."""
        self.router = router

    def requests_running(self, model: str) -> bool:
        return any(r["model"] == model and r["status"] == "running" for r in self.requests.recent())

    def start_pull(self, name_or_cid: str) -> str:
        """Start pulling a model over IPFS (as `POST /v1/models/pull` does); its progress comes on the bus as
        `pull.*` events carrying the returned id. LookupError: an unknown name or a bad CID; ConnectionError:
        no source can serve it."""
        try:
            return self.ipfs.start_pull(name_or_cid)
        except (UnknownModelError, InvalidCidError) as exc:
            raise LookupError(str(exc)) from None
        except IpfsError as exc:
            raise ConnectionError(str(exc)) from None

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._dir_lock.acquire)  # DataDirInUseError: another node runs here
        self.bus.bind_loop(loop)
        self.log_bridge.install("shoal.mesh", "shoal.models")
        for folder in (self.config.data_dir, self.config.blocks_dir, self.config.compile_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.identity = await loop.run_in_executor(
            None, Identity.load_or_create, self.config.data_dir, self.config.name or None
        )
        self.mesh.set_identity(self.identity)
        self.models.add_embedded()
        self.models.start()
        for service in self.services:
            await service.start()
            self._started_services.append(service)
        app = create_app(
            self,
            router=self.router,
            routes=[service.add_routes for service in self.services],
            own_hosts=[self.config.mesh.advertise] if self.config.mesh.advertise else [],
        )
        runner = api_runner(
            app,
            read_timeout_s=self.config.api.read_timeout_s,
            shutdown_timeout=self.config.api.shutdown_grace_s + 10.0,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.config.api.host, self.config.api.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise OSError(
                exc.errno, f"cannot listen on {self.config.api.host}:{self.config.api.port}: {exc.strerror}"
            ) from exc
        address = runner.addresses[0]
        self.host, self.port = str(address[0]), int(address[1])
        self.mesh.set_api_address(_peer_address(self.host, self.port))
        self.started = time.time()
        logger.info("node %s (%s) listening on %s", self.name, self.id, self.api_url)
        self._watch = asyncio.create_task(self._watch_pulls(), name="watch-pulls")
        if self.config.models.preload:
            self._preload = asyncio.create_task(self._prepare_default(), name="preload-default-model")

    async def _watch_pulls(self) -> None:
        """Make models servable as soon as a pull completes (the catalog is re-read off the loop)."""
        subscription = self.bus.subscribe()
        try:
            async for event in subscription:
                if event.kind == "pull.done":
                    try:
                        await self.models.refresh_async()
                    except (OSError, ValueError):
                        logger.exception("cannot read the catalog after pull %s", event.data.get("pull_id"))
        finally:
            subscription.close()

    async def _prepare_default(self) -> None:
        """Import the embedded model into the block store (so peers can fetch it), then load the default."""
        name = self.config.models.default
        try:
            cid = await self.ipfs.ensure_embedded()
            self.models.set_cid(DEFAULT_MODEL_NAME, str(cid))
            logger.info("embedded model %s is %s", DEFAULT_MODEL_NAME, cid)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("could not import the embedded model into the block store")
        try:
            await self.models.load(name)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("could not prepare the default model %s; requests will retry loading it", name)

    async def wait_ready(self) -> None:
        """Wait until the default model is loaded (or its preload has failed)."""
        if self._preload is not None:
            await asyncio.shield(self._preload)

    def begin_drain(self) -> None:
        """Refuse new completions and end event streams (called when shutdown starts)."""
        if not self.draining:
            self.draining = True
            logger.info("shutting down: no new requests accepted")
            self.bus.close()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.begin_drain()
        for task in (self._preload, self._watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._runner is not None:
            await self._runner.cleanup()  # stop listening, drain (on_shutdown), cancel stragglers
            self._runner = None
        for service in reversed(self._started_services):
            try:
                await service.stop()
            except Exception:
                logger.exception("stopping %s failed", type(service).__name__)
        self._started_services.clear()
        await self.models.stop()
        self._dir_lock.release()
        logger.info("node stopped")
        self.log_bridge.uninstall()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def build_node(config: NodeConfig, *, load_fn: LoadFn = load_engine) -> Node:
    """The node `shoal node` runs: IPFS, mesh, and offload/split routing over the mesh (`load_fn`: how a
    model is loaded, as for `Node`)."""
    from shoal.mesh.split.service import SplitService

    node = Node(config, load_fn=load_fn)
    split = SplitService(node, node.mesh)
    node.services.append(split)
    node.use_router(split.router)
    return node


async def serve_until_signalled(node: Node) -> None:
    """Start `node`, run until SIGINT or SIGTERM, then stop it gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        await stop.wait()
        logger.info("signal received; stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await node.stop()
