"""Spans a member holds loaded: what it advertises (`shards`), what they take from the memory it offers, and
how a planner reads another member's.

A member's stage host keeps spans loaded for peers' splits and its own — in use (a sequence or this node's
own part of a split on them) or idle (kept for reuse, standby or warming). Each is listed in the advert's
`shards` as `{"model", "cid", "start", "stop", "bytes", "idle"}` (at most `gossip.MAX_SHARDS`, in-use ones
first), `bytes` being what the planner would have charged for it (`span_bytes`). Spans in use
are subtracted from the memory the member advertises; idle ones count as free, because the host closes them
(least recently used first) as soon as the hosted spans together exceed what its budget leaves them — after
it builds a new stage, and on every advert refresh (`StageHost.trim_to`). A planner treats a span a device
holds (same model by name or CID, same layers) as needing no new memory and no fetch there
(`cost_model.Device.held`), so a repeated request lands where the first one did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from shoal.mesh.p2p.gossip import MAX_SHARDS
from shoal.mesh.split.cost_model import ModelShape
from shoal.mesh.split.hosted import HostedStage
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage

MAX_HELD = 4
"""Most held spans of one model the planner takes from one device (each is a pinning it tries)."""


def span_bytes(stage: Stage, file_size: int, overhead: int) -> int:
    """What a built stage holds, as the planner counts a span (`ModelShape.span_memory` from the model's file
    size, plus `overhead`), its KV cache being the pool the stage allocates up front (`max_total_tokens`:
    `[models] cache_tokens` on the compiled backend) — none where the cache grows with its sequences, as on
    the NumPy reference (each request's plan counts its own there)."""
    shape = ModelShape.from_config(stage.config, file_size)
    return shape.span_memory(stage.span, stage.max_total_tokens or 0, overhead)


def offered_budget(available: int, share: float, models: dict[str, int]) -> int:
    """The `memory_budget` a member advertises: the memory available now, the `max_memory_share` cap
    (`share` bytes) and what the models budget leaves (`models`: `NodeModels.memory()`), the spans in use
    (`hosted`) taken from both the cap and the models budget."""
    hosted = int(models.get("hosted", 0))
    left = int(models["budget"]) - int(models["used"]) - hosted
    return max(0, int(min(available, share - hosted, left)))


def held_by_cid(stages: Iterable[HostedStage], cid: str | None, span: LayerSpan) -> HostedStage | None:
    """The loaded stage of `span` of the model with this CID, whatever name it was opened by."""
    if not cid:
        return None
    return next((h for h in stages if h.cid == cid and h.key[1] == span), None)


def held_of(stages: Iterable[HostedStage], model: str, cid: str | None = None) -> tuple[LayerSpan, ...]:
    """Spans of `model` (by name, or by its CID) loaded in `stages`."""
    spans = dict.fromkeys(h.key[1] for h in stages if h.key[0] == model or (cid and h.cid == cid))
    return tuple(spans)[:MAX_HELD]


def busy_bytes(stages: Iterable[HostedStage]) -> int:
    """Bytes of the stages in use: what a host cannot drop on demand."""
    return sum(h.nbytes for h in stages if not h.idle)


def over_limit(stages: list[HostedStage], last_used: dict[tuple[str, LayerSpan], float], limit: int,
               keep: tuple[str, LayerSpan] | None = None) -> list[HostedStage]:
    """The idle stages to close, least recently used first (never `keep`), so that the rest hold at most
    `limit` bytes — or every idle one when even that is not enough."""
    held = sum(h.nbytes for h in stages)
    victims = []
    for hosted in sorted((h for h in stages if h.idle and h.key != keep),
                         key=lambda h: last_used.get(h.key, 0.0)):
        if held <= limit:
            break
        victims.append(hosted)
        held -= hosted.nbytes
    return victims


def shard_entries(stages: Iterable[HostedStage], cid_of: Callable[[str], str | None]) -> list[dict[str, Any]]:
    """The advert's `shards`: in-use stages first, at most `MAX_SHARDS`; `cid_of(name)` fills in the CID of a
    stage opened without one (this node's catalog)."""
    ordered = sorted(stages, key=lambda h: (h.idle, h.key[0], h.key[1].start))[:MAX_SHARDS]
    return [{"model": h.key[0], "cid": h.cid or cid_of(h.key[0]), "start": h.key[1].start,
             "stop": h.key[1].stop, "bytes": h.nbytes, "idle": h.idle} for h in ordered]


def advert_held(advert: dict[str, Any], model: str, cid: str | None, num_layers: int
                ) -> tuple[LayerSpan, ...]:
    """Spans of `model` (by name, or its `cid`) a peer's advert lists in `shards` (gossip kept only
    well-formed entries; anything else here, or layers past the model's `num_layers`, reads as absent)."""
    shards = advert.get("shards")
    spans: dict[LayerSpan, None] = {}
    for entry in shards if isinstance(shards, list) else []:
        if not isinstance(entry, dict):
            continue
        if entry.get("model") != model and not (cid and entry.get("cid") == cid):
            continue
        start, stop = entry.get("start"), entry.get("stop")
        if type(start) is int and type(stop) is int and 0 <= start < stop <= num_layers:
            spans[LayerSpan(start, stop)] = None
    return tuple(spans)[:MAX_HELD]
