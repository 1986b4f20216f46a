"""What the router plans from besides the scheduler: a forced route (tests and benchmarks), this node's
measured speeds, and a defensive reading of peers' adverts (a bad field is skipped, never trusted)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shoal.mesh.split import scheduler as sched
from shoal.mesh.split.held_spans import advert_held
from shoal.mesh.split.span_model import MAX_CATALOG, advert_catalog
from shoal.models.span import LayerSpan

DEFAULT_TPS = 10.0
"""Decode tok/s assumed for a device that holds the model but has not measured it (`Device.measured` false:
the scheduler never takes it for faster than the device it compares it with)."""
MAX_QUEUE = 1 << 20
"""Largest queue depth read from an advert (a bigger number is as good as this one)."""
MAX_BATCH_COST = 1.5
"""Largest batch cost read from an advert or measured (a noisy probe can make two requests look worse
than serial)."""
MAX_BATCH_STEPS = 16
"""Most batch sizes a `batch_steps` table may list (the probe measures 1-4)."""


@dataclass(frozen=True)
class ForcedRoute:
    """A fixed route for tests and benchmarks (`PUT /v1/mesh/route`): kind and (peer, span) stages."""

    kind: str
    stages: tuple[tuple[str, str], ...]

    @classmethod
    def from_body(cls, body: Any) -> ForcedRoute | None:
        if body is None or body == {}:
            return None
        if not isinstance(body, dict) or body.get("kind") not in ("local", "offload", "split"):
            raise ValueError("route must be {'kind': 'local'|'offload'|'split', 'stages': [...]}")
        stages = body.get("stages", [])
        if not isinstance(stages, list) or not all(
            isinstance(s, dict) and isinstance(s.get("peer"), str) and isinstance(s.get("layers"), str)
            for s in stages
        ):
            raise ValueError("stages must be a list of {'peer': id|'local', 'layers': 'a:b'}")
        return cls(body["kind"], tuple((s["peer"], s["layers"]) for s in stages))

    def to_plan(self, num_layers: int) -> sched.Plan:
        whole = LayerSpan.whole(num_layers)
        if self.kind == "local":
            assignments: tuple[sched.Assignment, ...] = (sched.Assignment(sched.LOCAL, whole),)
        else:
            assignments = tuple(
                sched.Assignment(peer, LayerSpan.parse(layers, num_layers)) for peer, layers in self.stages
            )
        if not assignments:
            raise ValueError("a forced offload or split needs stages")
        return sched.Plan(self.kind, assignments, sched.Prediction(0.0, 0.0, 0.0), ("forced",))  # type: ignore[arg-type]


class Speeds:
    """Measured local speeds per model, as advertised (`speed[model]` in the advert): `decode_tok_s` and
    `prefill_tok_s` (seeded by the speed probe after a model loads, then an exponential moving average over
    finished requests that ran alone), `batch_cost` (from the probe: the share of one request's step time a
    second request running alongside adds), `batch_steps` (from the probe: step time with 1, 2, 3, 4 requests
    running, relative to one alone) and `source` (`probe` or `requests`)."""

    def __init__(self) -> None:
        self.by_model: dict[str, dict[str, Any]] = {}

    def observe(self, model: str, prompt_tokens: int, ttft_s: float | None, tok_s: float | None) -> None:
        entry = self.by_model.setdefault(model, {})
        if ttft_s and prompt_tokens >= 8:
            entry["prefill_tok_s"] = ewma(entry.get("prefill_tok_s"), prompt_tokens / ttft_s)
        if tok_s:
            entry["decode_tok_s"] = ewma(entry.get("decode_tok_s"), tok_s)
            entry["source"] = "requests"

    def probed(self, model: str, decode_tok_s: float, prefill_tok_s: float, batch_cost: float | None,
               batch_steps: tuple[float, ...] = ()) -> None:
        """The speed probe's result: replaces the model's speeds (a fresh load, a fresh measurement)."""
        entry = self.by_model.setdefault(model, {})
        entry["decode_tok_s"] = round(decode_tok_s, 3)
        if prefill_tok_s > 0:
            entry["prefill_tok_s"] = round(prefill_tok_s, 3)
        if batch_cost is not None:
            entry["batch_cost"] = round(batch_cost, 3)
        if batch_steps:
            entry["batch_steps"] = [round(x, 3) for x in batch_steps]
        entry["source"] = "probe"

    def get(self, model: str) -> tuple[float, float]:
        entry = self.by_model.get(model, {})
        return entry.get("decode_tok_s", 0.0), entry.get("prefill_tok_s", 0.0)

    def batch_cost(self, model: str) -> float:
        return float(self.by_model.get(model, {}).get("batch_cost", 1.0))

    def batch_steps(self, model: str) -> tuple[float, ...]:
        return advert_steps(self.by_model.get(model, {}).get("batch_steps"))

    def measured(self, model: str) -> bool:
        return bool(self.by_model.get(model, {}).get("decode_tok_s"))


def ewma(old: float | None, new: float, alpha: float = 0.3) -> float:
    return round(new if old is None else (1 - alpha) * old + alpha * new, 3)


def advert_number(value: Any, default: float = 0.0) -> float:
    """A finite number from a peer's advert, or `default`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            if math.isfinite(value):
                return float(value)
        except OverflowError:
            pass
    return default


def advert_steps(value: Any) -> tuple[float, ...]:
    """`speed[model].batch_steps` (step time with 1, 2, … requests running, relative to one alone) as the
    planner may use it: at most `MAX_BATCH_STEPS` numbers, each made at least the one before it (and 1 for
    the first) and at most what `MAX_BATCH_COST` allows; anything else reads as absent."""
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_BATCH_STEPS:
        return ()
    steps: list[float] = []
    for n, item in enumerate(value):
        number = advert_number(item, -1.0)
        if number < 0:
            return ()
        steps.append(min(1 + MAX_BATCH_COST * n, max(steps[-1] if steps else 1.0, number)))
    return tuple(steps)


def advert_table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def advert_models(advert: dict[str, Any]) -> set[str]:
    names = set()
    for item in advert.get("models", []):
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, dict):
            names.update(str(item[k]) for k in ("name", "id", "cid") if isinstance(item.get(k), str))
    return names


def advert_in_use(advert: dict[str, Any]) -> list[str]:
    """The model names a member advertises as loaded (`split.in_use`), malformed entries left out."""
    split = advert.get("split")
    raw = split.get("in_use") if isinstance(split, dict) else None
    if not isinstance(raw, list):
        return []
    return [name for name in raw[:MAX_CATALOG] if isinstance(name, str) and 0 < len(name) <= 200]


def advert_loaded(advert: dict[str, Any], model: str, cid: str | None) -> bool:
    """Whether a member's engine has `model` loaded: its `split.in_use` names it, or names its `cid` (itself,
    or through the member's `split.catalog`)."""
    catalog = advert_catalog(advert)
    return any(name == model or (bool(cid) and cid in (name, catalog.get(name)))
               for name in advert_in_use(advert))


MAX_LINKS = 64
"""Links read from a peer's advert (`links`: {peer id: RTT ms}); a mesh of more members plans with the rest
unknown (a chain hop with no known RTT is costed as the star)."""
MAX_LINK_RTT_MS = 60_000.0


def advert_links(value: Any) -> tuple[tuple[str, float], ...]:
    """A peer's advertised links as (peer id, RTT seconds): string ids, RTTs that are numbers in
    [0, `MAX_LINK_RTT_MS`]; the rest (unmeasured links, junk) is left out."""
    if not isinstance(value, dict):
        return ()
    links = []
    for peer, rtt_ms in value.items():
        if len(links) == MAX_LINKS:
            break
        number = isinstance(rtt_ms, int | float) and not isinstance(rtt_ms, bool)
        if isinstance(peer, str) and peer and number and 0 <= rtt_ms <= MAX_LINK_RTT_MS:
            links.append((peer, rtt_ms / 1000))
    return tuple(links)


def advert_battery(advert: dict[str, Any]) -> float | None:
    """The advert's `battery` percent (gossip's field: a number, or null on mains power), clamped to 0–100;
    None when absent or junk (a device without a battery is never held back by a battery floor)."""
    value = advert_number(advert.get("battery"), -1.0)
    return None if value < 0 else min(value, 100.0)


def advert_device(peer_id: str, advert: dict[str, Any], model: str, *, holds: bool, trusted: bool,
                  rtt_s: float, link: str, placed: int = 0, fetch_bps: float = 0.0,
                  offload_link: bool = False, cid: str | None = None, num_layers: int = 0) -> sched.Device:
    """A peer as the planner sees it, from its advert: `speed[model]` (measured decode/prefill tok/s and
    batch cost; none: unmeasured), `queue_depth` (at least `placed`, the requests this node placed there
    that are still running: the advert lags), `split` (serves others, memory budget, whether its engine has
    the model loaded: `in_use` naming it or its `cid`, which holds it too), `battery`, and —
    given the model's `num_layers` — the spans of it (by name or `cid`) it holds loaded (`shards`:
    `split.held_spans`), and its own links' RTTs (`links`). `offload_link`: an offload's tokens from it
    would come over a direct link (what this node knows: its `OffloadClient.links_to`). Junk fields read as
    absent; ValueError when the result is not a valid device."""
    split = advert_table(advert.get("split"))
    speed = advert_table(advert_table(advert.get("speed")).get(model))
    battery = advert_battery(advert)
    free = int(advert_number(split.get("memory_budget"), advert_number(advert.get("free_memory"))))
    decode = advert_number(speed.get("decode_tok_s"))
    advertised = int(min(advert_number(advert.get("queue_depth")), MAX_QUEUE))
    loaded = advert_loaded(advert, model, cid)
    return sched.Device(
        peer_id,
        decode_tps=decode or DEFAULT_TPS,
        prefill_tps=advert_number(speed.get("prefill_tok_s")),
        free_memory=max(0, free),
        total_memory=max(0, free),
        queue_depth=max(0, advertised, placed),
        measured=decode > 0,
        batch_cost=min(MAX_BATCH_COST, max(0.0, advert_number(speed.get("batch_cost"), 1.0))),
        batch_steps=advert_steps(speed.get("batch_steps")),
        battery=battery,
        charging=advert.get("plugged") is True,
        trusted=trusted,
        serves_others=split.get("serve_others") is True,
        rtt_s=rtt_s,
        link=link,
        holds_model=holds or loaded,
        fetch_bps=fetch_bps,
        offload_link=offload_link,
        peer_rtts=advert_links(advert.get("links")),
        held=advert_held(advert, model, cid, num_layers) if num_layers > 0 else (),
        loaded=loaded,
    )
