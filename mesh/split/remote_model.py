"""A model this node does not hold but a peer serves: a stand-in for `ServedModel` so the API can accept the
request and the router can offload it.

The tokenizer lives with the model, so `RemoteTokenizer` asks the peer (`offload.tokenize`); the API calls
it from an executor thread, so it bridges to the event loop like `RemoteStage` does. Embeddings go to the same
peer (`remote_embed.RemoteEmbedder`, `offload.embed`). The model's shape comes from `offload.info`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.mesh.p2p.errors import MeshError, RemoteError
from shoal.mesh.split import wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.ports import MeshHandle
from shoal.mesh.split.remote_embed import RemoteEmbedder
from shoal.mesh.split.remote_stage import BRIDGE_GRACE_S
from shoal.models.config import ModelConfig
from shoal.models.errors import ModelError
from shoal.models.sampling import GGUF_SAMPLING_KEYS, SamplingParams

logger = logging.getLogger(__name__)


class RemoteTokenizer:
    """Tokenizes through the peer that holds the model. Blocking; call off the event loop."""

    def __init__(self, mesh: MeshHandle, loop: asyncio.AbstractEventLoop, peer_id: str, model: str,
                 vocab_size: int, timeout_s: float = SplitConfig.remote_tokenize_timeout_s) -> None:
        self._mesh = mesh
        self._loop = loop
        self.peer_id = peer_id
        self.model = model
        self.vocab_size = vocab_size
        self._timeout = timeout_s

    def _ids(self, body: dict[str, Any]) -> list[int]:
        coro = self._mesh.request(self.peer_id, wire.OFFLOAD_TOKENIZE, {"model": self.model, **body},
                                  self._timeout)
        try:
            reply = asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._timeout + BRIDGE_GRACE_S)
        except RemoteError as exc:
            if exc.code == wire.BAD_REQUEST:
                raise ValueError(exc.message) from None
            raise ModelError(f"tokenizing on {self.peer_id[:12]} failed: {exc}") from None
        except MeshError as exc:
            raise ModelError(f"tokenizing on {self.peer_id[:12]} failed: {exc}") from None
        ids = reply.get("ids")
        if not isinstance(ids, list) or any(type(t) is not int or not 0 <= t < self.vocab_size for t in ids):
            raise ModelError(f"{self.peer_id[:12]} returned malformed token ids")
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self._ids({"messages": [dict(m) for m in messages]})

    def encode(self, text: str) -> list[int]:
        return self._ids({"text": text})


@dataclass
class RemoteModel:
    """Quacks like `mesh.model_manager.ServedModel` where the API and the router read it."""

    name: str
    tokenizer: RemoteTokenizer
    context_length: int
    config: ModelConfig
    peer_id: str
    engine: None = None
    stages: list[Any] = field(default_factory=list)
    backend: str = "remote"
    weight_bytes: int = 0
    sampling_defaults: Mapping[str, float | int] = field(default_factory=dict)
    """The model's own (its GGUF `general.sampling.*`, from `offload.info`), so a request that leaves a field
    out samples as it would on the peer's own API."""
    embedder: RemoteEmbedder | None = None
    """Embeds through the peer (`offload.embed`)."""


async def find_remote_model(mesh: MeshHandle, name: str, candidates: list[str],
                            settings: SplitConfig | None = None) -> RemoteModel | None:
    """Ask the candidate peers (best first) about `name`; the first that answers sensibly backs the model."""
    settings = settings or SplitConfig()
    loop = asyncio.get_running_loop()
    for peer_id in candidates:
        try:
            info = await mesh.request(peer_id, wire.OFFLOAD_INFO, {"model": name},
                                      settings.remote_info_timeout_s)
            config = ModelConfig(**info["config"])
            vocab, context = info["vocab_size"], info["context_length"]
            if type(vocab) is not int or type(context) is not int or vocab <= 0 or context <= 0:
                raise ValueError("bad sizes")
            defaults = _sampling_defaults(info.get("sampling_defaults"))
        except MeshError as exc:
            logger.info("%s cannot serve %s: %s", peer_id[:12], name, exc)
            continue
        except (KeyError, TypeError, ValueError, ModelError) as exc:
            logger.warning("%s sent malformed info for %s: %s", peer_id[:12], name, exc)
            continue
        tokenizer = RemoteTokenizer(mesh, loop, peer_id, name, vocab, settings.remote_tokenize_timeout_s)
        embedder = RemoteEmbedder(mesh, loop, peer_id, name, config.hidden_size,
                                  settings.offload_token_timeout_s)
        return RemoteModel(name, tokenizer, context, config, peer_id, sampling_defaults=defaults,
                           embedder=embedder)
    return None


def _sampling_defaults(value: Any) -> dict[str, float | int]:
    """`offload.info`'s `sampling_defaults`, checked: known `SamplingParams` fields with values it accepts
    (ValueError otherwise; absent from an older peer: none)."""
    if value is None:
        return {}
    names = set(GGUF_SAMPLING_KEYS.values())
    if not isinstance(value, dict) or not set(value) <= names or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
        raise ValueError(f"sampling_defaults must map {sorted(names)} to numbers")
    SamplingParams(**value)  # in range
    return dict(value)
