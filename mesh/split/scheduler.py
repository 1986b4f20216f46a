"""Where a request runs: locally, offloaded whole to one peer, or split into a pipeline of layer ranges.

Pure functions over plain dataclasses: no I/O, no clocks. `plan()` takes what the node knows (its own
capability, the peers' adverts and link measurements, the policy, the model's shape and the request's size)
and returns the `Plan` with the earliest predicted finish, or raises `NoPlanError` saying why nothing fits.

The cost model (`split.cost_model`) predicts each option; `plan()` picks the cheapest allowed.

Layer ranges (`mesh.partition`). For an ordered choice of devices, two allocations are scored and the
cheaper kept (ties go to the balanced one, which spreads load for concurrent requests): **proportional** —
layers in proportion to each stage's decode speed, water-filled under memory caps — and **fastest-first** —
each stage, fastest first, takes as many layers as its memory allows. A stage's memory = its layers'
weights + their KV cache for prompt + max_tokens positions + the embedding (first stage) + the output head
(last stage; the embedding again when the head is tied to it) + `overhead_bytes`. Where devices of the
order hold spans loaded (`Device.held`), every pinning of stages to such spans is scored too
(`partition.allocate_around`): a pinned stage needs no new memory, so it may exceed its cap.

Policy (`mesh.split.policy.PolicyConfig`, the node's `[policy]`)
----------------------------------------------------------------
- Peers whose advert says they do not serve others are never used.
- `battery_floor` (percent): a peer on battery below it is not used. The local node below it prefers any
  feasible remote plan, and runs locally only when nothing else fits.
- `max_memory_share`: no device is planned past that share of its total memory (nor past its free memory).
  A span a device already holds loaded (`Device.held`: its advert's `shards`) needs no new memory: a
  repeated split lands where it did. Nor does the model a device's engine has loaded (`Device.loaded`: a
  peer's advert `split.in_use`, this node's engine): running the request whole there — locally or as an
  offload — counts only its KV cache and overhead (`cost_model.runs_whole`), as the budget is net of the
  loaded models already.
- `trusted_only_splits`: untrusted peers are left out of every remote plan — splits and offloads alike (an
  offload exposes the whole prompt, a split exposes hidden states; neither goes to a peer not trusted).
- `prefer_local`: when the local node can serve the request at all, it does.

Placement that pays off
-----------------------
- **Unmeasured speeds.** A device whose speed for the model was never measured (`Device.measured` false: no
  speed probe and no finished request yet) is never taken to be faster than the device it is compared with:
  an unmeasured peer gets this node's speed when this node is faster, and an unmeasured local node gets the
  fastest measured peer's. So nothing is offloaded *for speed* on a guess; load and memory still count.
- **Load.** Each device's time is scaled by its `load_factor` (1 + batch_cost × queue depth, and for the local
  node ÷ (1 − the share of its CPU its running offloads' relays take)): many requests at one node make a less
  busy peer the earlier finish, so concurrent requests spread over the members — where batching makes another
  request nearly free here, and each offload's relay costs this node CPU, they stay.
- **Hysteresis.** With `margin` > 0 (the router passes `[split] offload_gain_percent` while it runs requests
  locally, `stay_gain_percent` once it offloads), an automatic plan leaves the local node only when it is
  predicted to finish at least that fraction sooner: small differences in measured speed do not flap requests
  between devices. A request that asks for a route or prefers peers is planned without a margin.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shoal.mesh.split.cost_model import (
    LOCAL,
    Device,
    ModelShape,
    Prediction,
    Request,
    max_layers,
    predict,
    predict_offload,
    relay_share,
    request_memory,
    runs_whole,
)
from shoal.mesh.split.partition import (
    allocate_around,
    allocate_fastest_first,
    allocate_proportional,
    spans_of,
)
from shoal.mesh.split.policy import PolicyConfig
from shoal.models.span import LayerSpan

__all__ = [  # the planner, and the cost model's names its callers use
    "LOCAL", "Assignment", "Device", "ModelShape", "NoPlanError", "Plan", "PlanKind", "Prediction", "Request",
    "assume_unmeasured", "max_layers", "plan", "relay_share",
]

PlanKind = Literal["local", "offload", "split"]


class NoPlanError(Exception):
    """No device (or set of devices) can serve the request under the policy; the message says why."""

    def __init__(self, message: str, code: str = "no_route") -> None:
        super().__init__(message)
        self.code = code
        """`insufficient_memory` when the usable devices' memory budgets together cannot hold the model (for
        this request's context), else `no_route`."""


@dataclass(frozen=True)
class Assignment:
    device: str
    span: LayerSpan


@dataclass(frozen=True)
class Plan:
    kind: PlanKind
    stages: tuple[Assignment, ...]
    prediction: Prediction
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def devices(self) -> list[str]:
        return [a.device for a in self.stages]

    def to_route(self) -> dict[str, Any]:
        """The `shoal_route` description: kind, stages (device + layer range) and the prediction."""
        return {
            "kind": self.kind,
            "stages": [{"peer": a.device, "layers": str(a.span)} for a in self.stages],
            "predicted": self.prediction.to_dict(),
        }


def _eligible(devices: Iterable[Device], policy: PolicyConfig, exclude: frozenset[str]) -> list[Device]:
    out = []
    for d in devices:
        if d.id in exclude or d.decode_tps <= 0 or (not d.holds_model and d.fetch_bps <= 0):
            continue
        if not d.is_local and (
            not d.serves_others
            or d.below_battery_floor(policy)
            or (policy.trusted_only_splits and not d.trusted)
        ):
            continue
        out.append(d)
    return out


def _best_split(
    shape: ModelShape, request: Request, devices: Sequence[Device], policy: PolicyConfig, max_stages: int,
    chain: bool = False,
) -> Plan | None:
    best: Plan | None = None
    fastest = sorted(devices, key=lambda d: (-d.decode_tps, d.id))
    candidates = fastest[:6] + [d for d in fastest[6:] if d.held]  # a device holding a span is never cut
    for k in range(2, min(max_stages, len(candidates), shape.num_layers) + 1):
        for order in itertools.permutations(candidates, k):
            caps = [
                max_layers(shape, request, d, policy, i == 0, i == k - 1) for i, d in enumerate(order)
            ]
            speeds = [d.decode_tps / d.load_factor for d in order]
            allocations = [allocate(shape.num_layers, speeds, caps)
                           for allocate in (allocate_proportional, allocate_fastest_first)]
            for counts in allocations + _pinned(shape.num_layers, speeds, caps, order):
                if counts is None:
                    continue
                stages = list(zip(order, spans_of(counts), strict=True))
                prediction = predict(shape, request, stages, chain)
                plan = Plan("split", tuple(Assignment(d.id, s) for d, s in stages), prediction)
                if best is None or prediction.ttlt_s < best.prediction.ttlt_s - 1e-12:
                    best = plan
    return best


def _pinned(total: int, speeds: Sequence[float], caps: Sequence[int], order: Sequence[Device]
            ) -> list[list[int] | None]:
    """Allocations over `order` in which stages take spans their devices hold loaded (`Device.held`: no new
    memory, so past their caps), the other stages sharing the rest (`partition.allocate_around`): one per way
    of pinning at least one stage to a span that fits its position."""
    if not any(d.held for d in order):
        return []
    k = len(order)
    fits = [[h for h in d.held if (h.start == 0) == (i == 0) and (h.stop == total) == (i == k - 1)]
            for i, d in enumerate(order)]  # a span where its stage would sit: first, middle or last
    choices = [[None, *spans] for spans in fits]
    return [allocate_around(total, speeds, caps, pins) for pins in itertools.product(*choices)
            if any(pin is not None for pin in pins)]


def assume_unmeasured(local: Device | None, peers: Sequence[Device]) -> tuple[Device | None, list[Device]]:
    """`local` and `peers` with unmeasured speeds replaced so that no unmeasured device looks faster than the
    one it is compared with (the module docstring, *Unmeasured speeds*)."""
    measured = [p for p in peers if p.measured]
    if local is not None and not local.measured and measured:
        fastest = max(measured, key=lambda p: (p.decode_tps, p.effective_prefill_tps))
        local = dataclasses.replace(local, decode_tps=fastest.decode_tps,
                                    prefill_tps=fastest.effective_prefill_tps)
    if local is None:
        return None, list(peers)
    out = []
    for p in peers:
        if not p.measured:
            p = dataclasses.replace(p, decode_tps=min(p.decode_tps, local.decode_tps),
                                    prefill_tps=min(p.effective_prefill_tps, local.effective_prefill_tps))
        out.append(p)
    return local, out


def plan(
    shape: ModelShape,
    request: Request,
    local: Device | None,
    peers: Sequence[Device],
    policy: PolicyConfig,
    *,
    exclude: Iterable[str] = (),
    max_stages: int = 3,
    kinds: Iterable[PlanKind] | None = None,
    prefer: Sequence[str] = (),
    margin: float = 0.0,
    chain: bool = False,
) -> Plan:
    """The plan with the least predicted time-to-last-token, under `policy`; raises `NoPlanError`.

    `local` is None when this node cannot compute at all; `exclude` names devices to leave out (a re-plan
    after a stage was lost, or peers a request avoids). `kinds` keeps only plans of those kinds (a request's
    own route; `prefer_local` then only applies when `local` is among them). `prefer` ranks plans that use
    those devices first, in that order (a split then draws its peers from them when any is usable).
    `margin` (0 <= margin < 1): with `kinds` and `prefer` unset, a plan that leaves the local node must be
    predicted to finish at least that fraction sooner than running locally (hysteresis). `chain`: a split's
    decode steps pass between its remote stages directly (`[split] chain_stages`; `cost_model.predict`).
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    excluded = frozenset(exclude)
    if local is not None and not local.is_local:
        raise ValueError(f"the local device must have id {LOCAL!r}, not {local.id!r}")
    if any(p.is_local for p in peers):
        raise ValueError(f"a peer may not use the reserved id {LOCAL!r}")
    whole = LayerSpan.whole(shape.num_layers)
    local, peers = assume_unmeasured(local, peers)
    allowed = frozenset(kinds) if kinds is not None else frozenset(("local", "offload", "split"))
    usable = _eligible(([local] if local else []) + list(peers), policy, excluded)
    local_ok = [d for d in usable if d.is_local]
    remote = [d for d in usable if not d.is_local]

    local_plan: Plan | None = None
    # the engine's loaded model runs here in the request's KV cache; a whole span the stage host holds is not
    # the engine's model: running here without it loaded still needs its memory
    if local_ok and runs_whole(shape, request, local_ok[0], policy):
        prediction = predict(shape, request, [(local_ok[0], whole)])
        local_plan = Plan("local", (Assignment(LOCAL, whole),), prediction)
    if local_plan is not None and (allowed == {"local"} or (
            kinds is None and policy.prefer_local and not local_ok[0].below_battery_floor(policy))):
        return local_plan

    options: list[Plan] = [] if local_plan is None else [local_plan]
    for d in remote:  # an offload runs on the peer's own engine: only a peer holding the model can take it
        if d.holds_model and runs_whole(shape, request, d, policy):
            options.append(Plan("offload", (Assignment(d.id, whole),), predict_offload(shape, request, d)))
    if "split" in allowed:
        favoured = [d for d in usable if d.is_local or d.id in prefer]
        pool = favoured if any(not d.is_local for d in favoured) else usable
        split = _best_split(shape, request, pool, policy, max_stages, chain)
        if split is not None:
            options.append(split)
    options = [p for p in options if p.kind in allowed]
    if local_ok and local_ok[0].below_battery_floor(policy):
        without_local = [p for p in options if LOCAL not in p.devices]
        options = without_local or options
    if not options:
        why = _why_none(shape, request, local, peers, policy, excluded, allowed)
        raise NoPlanError(why, "insufficient_memory" if why.startswith("not enough memory") else "no_route")
    kind_rank = {"local": 0, "offload": 1, "split": 2}
    rank = {device: i for i, device in enumerate(prefer)}

    def preferred(p: Plan) -> int:
        return min((rank[d] for d in p.devices if d in rank), default=len(rank))

    best = min(options, key=lambda p: (preferred(p), round(p.prediction.ttlt_s, 9), kind_rank[p.kind],
                                       p.devices))
    if (margin > 0 and kinds is None and not prefer and local_plan is not None and local_plan in options
            and best is not local_plan
            and best.prediction.ttlt_s > local_plan.prediction.ttlt_s * (1 - margin)):
        note = (f"{best.kind} on {', '.join(d[:12] for d in best.devices)} predicted "
                f"{best.prediction.ttlt_s:.3f} s, not {margin:.0%} sooner than local "
                f"{local_plan.prediction.ttlt_s:.3f} s")
        return dataclasses.replace(local_plan, notes=(note,))
    return best


def _why_none(
    shape: ModelShape,
    request: Request,
    local: Device | None,
    peers: Sequence[Device],
    policy: PolicyConfig,
    excluded: frozenset[str],
    allowed: frozenset[str] = frozenset(("local", "offload", "split")),
) -> str:
    usable = _eligible(([local] if local else []) + list(peers), policy, excluded)
    if "local" not in allowed and not any(not d.is_local for d in usable):
        return (
            f"no peer can take this request ({', '.join(sorted(allowed))}): {len(peers)} peer(s) known, "
            f"none usable under the policy (serving others, trust, battery floor {policy.battery_floor}%)"
        )
    if not usable:
        return (
            f"no device can run this model: {len(peers)} peer(s) known, none usable under the policy "
            f"(serving others, trust, battery floor {policy.battery_floor}%, measured speed)"
        )
    budget = sum(d.memory_budget(policy) for d in usable)
    whole = LayerSpan.whole(shape.num_layers)
    need = shape.span_memory(whole, request.context_tokens, request.overhead_bytes)
    loaded = [d for d in usable if d.loaded and d.holds_model and not d.is_local]
    offload = (f"; a peer with it loaded ({', '.join(d.id[:12] for d in loaded)}) needs about "
               f"{request_memory(shape, request) / 2**20:.0f} MiB for an offload" if loaded else "")
    return (
        f"not enough memory: {len(usable)} usable device(s) offer {budget / 2**20:.0f} MiB in all under "
        f"max_memory_share {policy.max_memory_share}, the model needs about {need / 2**20:.0f} MiB "
        f"(+ overhead per stage) for {request.context_tokens} tokens of context{offload}"
    )
