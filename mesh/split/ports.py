"""What offload and split need of the node and of the mesh service: the seams `SplitService` is handed.

The node (`shoal.mesh.node.node.Node`) is a `NodeView`; the mesh service
(`shoal.mesh.p2p.service.MeshService`) is a `MeshHandle`. Both satisfy these Protocols structurally: split
imports no node module (the import rule: node -> split), and tests can hand it small fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.gossip import Gossip
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.p2p.peer import BinaryHandler, ControlHandler, Peer
from shoal.mesh.route import Route
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.policy import PolicyConfig
from shoal.models.served import ServedModel
from shoal.models.span import LayerSpan


class MeshHandle(Protocol):
    """The handle split uses to talk to peers."""

    @property
    def config(self) -> MeshConfig: ...

    @property
    def gossip(self) -> Gossip: ...

    @property
    def identity(self) -> Identity:
        """This node's key (receipts are signed with it); available once the mesh service started."""
        ...

    def on_control(self, frame_type: str, handler: ControlHandler) -> None: ...

    def on_binary(self, kind: int, handler: BinaryHandler) -> None: ...

    def add_peer_listener(self, listener: Callable[[str, Peer], None]) -> None: ...

    def spawn(self, coro: Awaitable[Any], name: str = "mesh") -> asyncio.Task[Any]: ...

    def peer(self, peer_id: str) -> Peer:
        """The live link to `peer_id` (`PeerUnavailable` when there is none)."""
        ...

    def connected_peers(self) -> list[Peer]: ...

    async def request(
        self, peer_id: str, frame_type: str, body: dict[str, Any], timeout_s: float | None = None
    ) -> dict[str, Any]: ...


class HeldModel(Protocol):
    """A model file this node holds."""

    @property
    def path(self) -> Path: ...

    @property
    def cid(self) -> str | None: ...

    @property
    def size(self) -> int: ...


class NodeModels(Protocol):
    """The node's models. Unknown names raise `ModelNotFoundError` (a `LookupError`)."""

    @property
    def cache_dir(self) -> Path | None: ...

    def list_models(self) -> list[dict[str, Any]]: ...

    def loaded_names(self) -> list[str]: ...

    def served(self, name: str) -> ServedModel | None: ...

    def resolve(self, name_or_cid: str) -> HeldModel: ...

    async def refresh_async(self) -> None:
        """Pick up model files published or pulled since (reads the catalog off the event loop)."""
        ...

    async def acquire(self, name: str) -> ServedModel: ...

    async def compile(self, name: str, target: str | None = None, layers: str | None = None
                      ) -> dict[str, Any]:
        """Build (or find cached) the compiled library for `layers` (None: all) of `name`, loading nothing."""
        ...

    def memory(self) -> dict[str, int]:
        """`budget`, `used` and `hosted` (bytes): the loaded models' memory estimates and the spans in use on
        the stage host, against their budget."""
        ...

    hosted: Callable[[], int]
    """Bytes of the spans in use on this node's stage host, which the models' budget counts too (the split
    service sets it)."""


class ModelSettings(Protocol):
    """The `[models]` settings split builds hosted stages with."""

    @property
    def backend(self) -> str: ...

    @property
    def target(self) -> str | None: ...

    @property
    def context(self) -> int | None:
        """Longest prompt + completion of one request (None: the model's trained context)."""
        ...


class NodeSettings(Protocol):
    @property
    def split(self) -> SplitConfig: ...

    @property
    def data_dir(self) -> Path: ...

    @property
    def models(self) -> ModelSettings: ...


class SpanFetcher(Protocol):
    """The node's IPFS service: fetches one layer span of a model it does not hold (None: the GGUF header
    alone — tokenizer and shape), into a sparse file."""

    async def pull_span(self, name_or_cid: str, span: LayerSpan | None) -> Path: ...


class NodeView(Protocol):
    """What split needs of the node: settings, policy, models, the IPFS service and the API host."""

    @property
    def config(self) -> NodeSettings: ...

    @property
    def policy(self) -> PolicyConfig: ...

    @property
    def models(self) -> NodeModels: ...

    @property
    def ipfs(self) -> SpanFetcher: ...

    @property
    def host(self) -> str: ...


class Observed(Protocol):
    """A finished request's record, as the router reads it to learn this node's speed."""

    @property
    def route(self) -> Route: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def ttft_s(self) -> float | None: ...

    @property
    def tok_s(self) -> float | None: ...
