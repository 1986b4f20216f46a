"""A model this node serves without holding it: found by name or CID in peers' adverts, known here only by its
GGUF header (tokenizer and shape), fetched by CID. The planner then runs it wherever the members' memory
budgets allow — offloaded whole to a peer that can hold it, or split over several members, each stage
fetching only its own layers' bytes by CID from whoever holds them (`SplitService._model_path`).

`SpanModel` is a `Servable` with no engine; `SpanModels` opens one per CID once (the header is a few MiB of
tokenizer and tensor index, kept as `models/<cid>.header.gguf`, a sparse file). `advert_catalog` and
`cid_in_adverts` read the `split.catalog` field (name → CID of the complete model files a member holds) that
`SplitService` puts in each advert.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.mesh.split.ports import NodeView
from shoal.models.config import ModelConfig
from shoal.models.errors import ModelError
from shoal.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_CATALOG = 64
"""Names a member lists in its advert's `catalog` (more are left out)."""


@dataclass
class SpanModel:
    """Quacks like `ServedModel` where the API and the router read it; `cid` is what stages fetch by."""

    name: str
    cid: str
    tokenizer: Tokenizer
    context_length: int
    config: ModelConfig
    weight_bytes: int
    """Bytes of the whole file (the header says where every tensor ends)."""
    sampling_defaults: Mapping[str, float | int] = field(default_factory=dict)
    engine: None = None
    backend: str = "split"
    embedder: None = None
    """Embeddings run where a model is loaded whole."""


def advert_catalog(advert: Mapping[str, Any]) -> dict[str, str]:
    """A member's advertised catalog (`split.catalog`: name → CID), with anything malformed left out."""
    split = advert.get("split")
    raw = split.get("catalog") if isinstance(split, dict) else None
    if not isinstance(raw, dict):
        return {}
    out: dict[str, str] = {}
    for name, cid in list(raw.items())[:MAX_CATALOG]:
        if isinstance(name, str) and isinstance(cid, str) and 0 < len(name) <= 200 and _cid_like(cid):
            out[name] = cid
    return out


def _cid_like(text: str) -> bool:
    return 0 < len(text) <= 128 and text.isalnum()


def cid_in_adverts(name: str, adverts: Iterable[Mapping[str, Any]]) -> str | None:
    """The CID the members' adverts give `name` (the one most of them name; `name` itself when it is a CID
    some member holds), or None."""
    votes: Counter[str] = Counter()
    for advert in adverts:
        catalog = advert_catalog(advert)
        if name in catalog:
            votes[catalog[name]] += 1
        elif name in catalog.values():
            votes[name] += 1
    if not votes:
        return None
    return min(votes, key=lambda cid: (-votes[cid], cid))


class SpanModels:
    """`SpanModel`s by CID, each opened once from its header (fetched over IPFS: `NodeView.ipfs`)."""

    def __init__(self, node: NodeView) -> None:
        self._node = node
        self._models: dict[str, SpanModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def get_cached(self, name: str) -> SpanModel | None:
        return next((m for m in self._models.values() if name in (m.name, m.cid)), None)

    async def open(self, name: str, cid: str, timeout_s: float) -> SpanModel:
        """The model `name` (CID `cid`) from its header; raises `ModelError` when the header cannot be
        fetched or read."""
        model = self._models.get(cid)
        if model is not None:
            return model if model.name == name else _renamed(model, name)
        async with self._locks.setdefault(cid, asyncio.Lock()):
            model = self._models.get(cid)
            if model is None:
                model = self._models[cid] = await self._open(name, cid, timeout_s)
        return model if model.name == name else _renamed(model, name)

    async def _open(self, name: str, cid: str, timeout_s: float) -> SpanModel:
        logger.info("fetching the header of %s (%s) to plan it over the mesh", name, cid)
        try:
            async with asyncio.timeout(timeout_s):
                path = await self._node.ipfs.pull_span(cid, None)
        except TimeoutError:
            raise ModelError(f"fetching the header of {name} ({cid}) took over {timeout_s:.0f} s") from None
        except (LookupError, ValueError, OSError, ModelError) as exc:
            raise ModelError(f"cannot fetch the header of {name} ({cid}): {exc}") from exc
        except Exception as exc:  # the IPFS layer's own errors (split does not import them)
            raise ModelError(f"cannot fetch the header of {name} ({cid}): {exc}") from exc

        def read() -> SpanModel:
            from shoal.models.loader import open_model
            from shoal.models.sampling import defaults_from_gguf

            loaded = open_model(path)
            limit = self._node.config.models.context
            context = min(limit or loaded.config.context_length, loaded.config.context_length)
            return SpanModel(name, cid, loaded.tokenizer, context, loaded.config, loaded.gguf.index.file_size,
                             defaults_from_gguf(loaded.gguf.metadata))

        return await asyncio.to_thread(read)


def _renamed(model: SpanModel, name: str) -> SpanModel:
    """The same model under another of its names (stages resolve the name a request used, or the CID)."""
    from dataclasses import replace

    return replace(model, name=name)
