"""Embeddings through a peer: a node that does not hold a model asks one that does (`offload.embed`).

Serving side (`EmbedServer`): the policy gate and the peer's quota as for an offload, the body checked
(model known and loaded, token ids in its vocabulary, each input within its context, at most
`wire.MAX_EMBED_INPUTS` inputs and `wire.MAX_EMBED_IDS` ids, no more vectors than one reply holds), at most
`max_requests` at once; the vectors are computed off the event loop by the model's own `Embedder` (the same
NumPy forward and mean pooling as a local request) and sent as base64 float32, so the origin's answer is
bit-identical to the serving node's own.

Origin side (`RemoteEmbedder`, a `RemoteModel`'s `embedder`): blocking like `RemoteTokenizer` (the API calls
it from an executor thread); splits the inputs into frames that fit, checks every reply, and turns a peer's
refusal or a lost link into the API's coded `RouteFailed` (never a 500).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from shoal.mesh.p2p.errors import MeshError, RemoteError
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.protocol import ControlFrame
from shoal.mesh.route import RouteFailed
from shoal.mesh.split import wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.cost_model import Device
from shoal.mesh.split.peer_failures import peer_failure
from shoal.mesh.split.policy import PolicyConfig
from shoal.mesh.split.ports import MeshHandle
from shoal.mesh.split.quota import PeerQuota, check_allowed
from shoal.mesh.split.remote_stage import BRIDGE_GRACE_S, StageLost
from shoal.models.errors import ContextOverflowError
from shoal.models.served import ServedModel

logger = logging.getLogger(__name__)

Acquire = Callable[[str], Awaitable[ServedModel]]


class EmbedServer:
    """Answers `offload.embed` with this node's loaded models."""

    def __init__(self, mesh: MeshHandle, acquire: Acquire, gate: Callable[[], str | None], *,
                 max_requests: int = 8, quota: PeerQuota | None = None) -> None:
        self._acquire = acquire
        self._gate = gate
        self._quota = quota
        self._max = max_requests
        self._running = 0
        self.served = 0
        mesh.on_control(wire.OFFLOAD_EMBED, self._on_embed)

    async def _on_embed(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        check_allowed(peer.peer_id, self._gate, self._quota)
        model, inputs = frame.body.get("model"), frame.body.get("inputs")
        if not isinstance(model, str) or not model:
            raise RemoteError(wire.BAD_REQUEST, "offload.embed needs a model")
        if not isinstance(inputs, list) or not 0 < len(inputs) <= wire.MAX_EMBED_INPUTS or not all(
                isinstance(ids, list) and ids and all(type(t) is int for t in ids) for ids in inputs):
            raise RemoteError(wire.BAD_REQUEST,
                              f"inputs must be 1-{wire.MAX_EMBED_INPUTS} non-empty lists of token ids")
        total = sum(len(ids) for ids in inputs)
        if total > wire.MAX_EMBED_IDS:
            raise RemoteError(wire.BAD_REQUEST, f"at most {wire.MAX_EMBED_IDS} token ids per offload.embed")
        if self._running >= self._max:
            raise RemoteError(wire.BUSY, f"embedding {self._max} requests already")
        try:
            served = await self._acquire(model)
        except LookupError as exc:
            raise RemoteError(wire.NO_MODEL, str(exc)[:300]) from None
        embedder = served.embedder
        if embedder is None:
            raise RemoteError(wire.NO_MODEL, f"{model} cannot embed on this node")
        vocab, context = served.tokenizer.vocab_size, served.context_length
        if any(min(ids) < 0 or max(ids) >= vocab for ids in inputs):
            raise RemoteError(wire.BAD_REQUEST, f"token ids must be in 0..{vocab - 1}")
        if any(len(ids) > context for ids in inputs):
            raise RemoteError(wire.BAD_REQUEST, f"an input is longer than the context of {context} tokens")
        dim = served.config.hidden_size
        if len(inputs) > wire.embed_batch(dim):
            raise RemoteError(wire.BAD_REQUEST, f"at most {wire.embed_batch(dim)} inputs of {dim} dimensions "
                                                "fit one reply")
        self._running += 1
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(None, embedder.embed, inputs)
        except (ContextOverflowError, ValueError) as exc:
            raise RemoteError(wire.BAD_REQUEST, str(exc)[:300]) from None
        finally:
            self._running -= 1
        if self._quota is not None:
            self._quota.record(peer.peer_id, total)
        self.served += 1
        logger.info("embedded %d inputs (%d tokens) of %s for %s", len(inputs), total, model,
                    peer.peer_id[:12])
        return {"dim": dim, "vectors": [wire.encode_vector(v) for v in vectors]}


class RemoteEmbedder:
    """Embeds through the peer that holds the model. Blocking; call off the event loop."""

    def __init__(self, mesh: MeshHandle, loop: asyncio.AbstractEventLoop, peer_id: str, model: str, dim: int,
                 timeout_s: float) -> None:
        self._mesh = mesh
        self._loop = loop
        self.peer_id = peer_id
        self.model = model
        self.dim = dim
        self._timeout = timeout_s

    @property
    def dimensions(self) -> int:
        return self.dim

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One unit vector per input, as the peer's own `Embedder` computes it. Raises RouteFailed when the
        peer refuses or cannot be reached, ContextOverflowError for an input too long to send."""
        per_frame = wire.embed_batch(self.dim)
        if per_frame < 1:
            raise RouteFailed(503, "no_route", f"{self.dim}-wide embeddings do not fit a mesh reply")
        out: list[np.ndarray] = []
        batch: list[list[int]] = []
        for item in inputs:
            ids = [int(t) for t in item]
            if len(ids) > wire.MAX_EMBED_IDS:
                raise ContextOverflowError(f"an input of {len(ids)} tokens is over the {wire.MAX_EMBED_IDS} "
                                           "that embedding through a peer takes")
            if batch and (len(batch) >= per_frame or sum(map(len, batch)) + len(ids) > wire.MAX_EMBED_IDS):
                out += self._ask(batch)
                batch = []
            batch.append(ids)
        if batch:
            out += self._ask(batch)
        return out

    def _ask(self, batch: list[list[int]]) -> list[np.ndarray]:
        coro = self._mesh.request(self.peer_id, wire.OFFLOAD_EMBED, {"model": self.model, "inputs": batch},
                                  self._timeout)
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            reply = future.result(self._timeout + BRIDGE_GRACE_S)
        except RemoteError as exc:
            raise peer_failure(exc, self.peer_id) from None
        except (MeshError, TimeoutError) as exc:
            future.cancel()
            raise peer_failure(StageLost(self.peer_id, str(exc) or "no reply")) from None
        vectors = reply.get("vectors")
        try:
            if reply.get("dim") != self.dim or not isinstance(vectors, list) or len(vectors) != len(batch):
                raise ValueError(f"expected {len(batch)} vectors of {self.dim} dimensions")
            return [wire.decode_vector(v, self.dim) for v in vectors]
        except ValueError as exc:
            logger.warning("%s sent malformed embeddings: %s", self.peer_id[:12], exc)
            raise RouteFailed(503, "peer_unreachable", f"{self.peer_id[:16]}: malformed embeddings") from None


def pick_embedder(mesh: MeshHandle, name: str, dim: int, devices: Sequence[Device], policy: PolicyConfig,
                  settings: SplitConfig) -> RemoteEmbedder | None:
    """An embedder for `name` through the best usable peer that holds it (None: no such peer). Call it on the
    event loop (the embedder bridges back to it). Browser members serve offloads only, not `offload.embed`."""
    browsers = {p.peer_id for p in mesh.connected_peers() if p.advert.get("kind") == "browser"}
    usable = [d for d in devices if d.holds_model and d.serves_others and d.id not in browsers
              and (d.trusted or not policy.trusted_only_splits) and not d.below_battery_floor(policy)]
    if not usable:
        return None
    best = min(usable, key=lambda d: (-d.decode_tps, d.rtt_s))
    loop = asyncio.get_running_loop()
    return RemoteEmbedder(mesh, loop, best.id, name, dim, settings.offload_token_timeout_s)
