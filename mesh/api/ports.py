"""What the HTTP API needs of the node and of the request router: the seams `create_app` is handed.

The node (`shoal.mesh.node.node.Node`) is a `NodePort`; the split package's `Router` is a `RouterPort`. Both
satisfy these Protocols structurally, so the API imports neither (the import rule: node -> api, never back).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from shoal.mesh.api.metrics import NodeMetrics
from shoal.mesh.api.records import RequestRecord
from shoal.mesh.events import EventBus
from shoal.mesh.route import Route, RouteChoice
from shoal.models.generate import TokenEvent
from shoal.models.sampling import SamplingParams
from shoal.models.served import Embeds, Servable, ServedModel


class ApiSettings(Protocol):
    """The `[api]` settings the app reads."""

    @property
    def key(self) -> str | None: ...

    @property
    def max_body_bytes(self) -> int: ...

    @property
    def shutdown_grace_s(self) -> float: ...

    @property
    def host(self) -> str: ...

    @property
    def allowed_hosts(self) -> tuple[str, ...]: ...

    @property
    def allowed_origins(self) -> tuple[str, ...]: ...

    @property
    def read_timeout_s(self) -> float: ...


class ModelSettings(Protocol):
    """The `[models]` settings the app reads."""

    @property
    def default(self) -> str: ...


class NodeSettings(Protocol):
    @property
    def api(self) -> ApiSettings: ...

    @property
    def models(self) -> ModelSettings: ...


class Policy(Protocol):
    """The node's `[policy]` (`GET/PUT /v1/policy`)."""

    def to_dict(self) -> dict[str, Any]: ...


class Models(Protocol):
    """The node's models: the catalog and the engines loaded. Unknown names raise `ModelNotFoundError`."""

    async def refresh_async(self) -> None: ...

    def list_models(self) -> list[dict[str, Any]]: ...

    def loaded_names(self) -> list[str]: ...

    def waiting(self) -> int: ...

    def kv_usage(self) -> tuple[int, int]: ...

    def active_sequences(self) -> int: ...

    def resolve(self, name_or_cid: str) -> object: ...

    async def acquire(self, name: str, keep_alive: float | None = None) -> ServedModel:
        """The model, loaded on first use; `keep_alive`: the request's own (seconds, negative: forever)."""
        ...

    def hold(self, name: str) -> AbstractContextManager[None]:
        """In use for the block (a request's life): never unloaded meanwhile; keep_alive runs from its end."""
        ...

    def set_keep_alive(self, name: str, seconds: float | None) -> None: ...

    async def release(self, name: str) -> bool:
        """keep_alive 0 now: unload it at once if idle (True), else when its requests end."""
        ...

    def memory(self) -> dict[str, int]:
        """`budget` and `used` (bytes): the loaded models' memory estimates against the node's budget."""
        ...

    def residency(self, name: str) -> dict[str, Any]:
        """`state`, `loaded`, `memory`, `keep_alive`, `expires_at`, `requests` of a model."""
        ...

    async def load(self, name: str) -> ServedModel: ...

    async def unload(self, name: str) -> bool: ...

    async def compile(
        self, name: str, target: str | None = None, layers: str | None = None
    ) -> dict[str, Any]: ...


class RequestLog(Protocol):
    """Recent completion requests (`GET /v1/mesh/requests`)."""

    def start(self, model: str, kind: str = "chatcmpl") -> RequestRecord: ...

    def finish(self, record: RequestRecord, status: str) -> None: ...

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]: ...


class LogLines(Protocol):
    """Recent log lines (`GET /v1/logs`)."""

    def lines(self, level: str = "INFO", limit: int = 200) -> list[dict[str, Any]]: ...


class NodePort(Protocol):
    """What the API needs of the node it serves."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def config(self) -> NodeSettings: ...

    @property
    def bus(self) -> EventBus: ...

    @property
    def models(self) -> Models: ...

    @property
    def metrics(self) -> NodeMetrics: ...

    @property
    def requests(self) -> RequestLog: ...

    @property
    def log_bridge(self) -> LogLines: ...

    @property
    def policy(self) -> Policy: ...

    @property
    def draining(self) -> bool: ...

    def describe(self) -> dict[str, Any]: ...

    def set_policy(self, changes: dict[str, Any]) -> Policy:
        """Apply a partial policy update; raises `ValueError` (a `ConfigError`) on bad keys or values."""
        ...

    def requests_running(self, model: str) -> bool: ...

    def begin_drain(self) -> None: ...

    def start_pull(self, name_or_cid: str) -> str:
        """Start pulling a model over IPFS; returns the id its `pull.*` bus events carry. LookupError: unknown
        name or bad CID; ConnectionError: no source."""
        ...


class RouterPort(Protocol):
    """Routes a completion: locally, offloaded to one peer, or split over several (`mesh.split.router`)."""

    async def remote_model(self, name: str) -> Servable | None:
        """A stand-in for a model this node does not hold but a usable peer serves (None if none does)."""
        ...

    def stream(
        self, served: Servable, prompt_ids: list[int], params: SamplingParams, route: Route,
        choice: RouteChoice | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """The request's token events, routed within `choice` (the request's own wishes); fills `route` in
        (kind, peers, spans, replans, timings). Raises `RouteFailed` when no device takes it."""
        ...

    async def remote_embedder(self, name: str, dim: int) -> Embeds | None:
        """Embeds `name` (`dim` wide) through a peer that holds it, for a stand-in model without an
        `embedder` of its own (None: no peer can)."""
        ...

    def observe(self, model: str, record: RequestRecord) -> None:
        """Feed a finished request's timings back (the advertised speed)."""
        ...
