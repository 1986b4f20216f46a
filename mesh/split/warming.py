"""Warming: what plans at other members would likely ask of this node, prepared before any request asks.

A member advertises the models it has loaded (`split.in_use`). When a peer has model M in use and this node
holds M's bytes (or may fetch them: `[split] warm_fetch_spans`), `Warming` asks the planner what a request for
M at that peer would put on this node if it left the peer — the same `scheduler.plan` the peer runs, fed
with the peer's advert (its speed, load and battery; it runs M whole already, so memory does not cap its own
part) and this node as that peer would see it (speed, memory budget), for a typical request
(`WARM_PROMPT_TOKENS` + `WARM_MAX_TOKENS`), with this node preferred. The answer is a layer span (a split's
stage here: loaded, so compiled, as an idle stage of the `StageHost`) or the whole model (an offload here:
loaded into the node's models when its budget has room for it without unloading anything, else compiled
only, on the compiled backend).

Bounds: one piece of work at a time, in a background task (the loads run on the host's and the models'
threads, never on the event loop); only while this node runs nothing else (`load()` is 0) and its policy
lets it serve others (`serve_others`, battery floor, not `metered`); a span only while the host has room
for one more idle stage (`keep_idle_stages`) and the span fits both `standby_max_mb` and what the node's
models budget has left (a stage warming loaded for an older guess may be closed for it, never one a
request uses); nothing busy is unloaded for it. Each (peer, model) is planned for again when its likely part
changes (at most every `SETTLE_S`) and every `RECONSIDER_S`; what warming loaded and the node unloaded since
is not loaded again for `RELOAD_AFTER_S`. `view()` lists the guesses and what was prepared, skipped and why
(`GET /v1/mesh/route`'s `warming`, the TUI's Mesh tab); `[split] warm_peers_models` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from shoal.mesh.split import scheduler as sched
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.plan_inputs import advert_device, advert_in_use
from shoal.mesh.split.policy import PolicyConfig
from shoal.mesh.split.ports import MeshHandle, NodeView
from shoal.mesh.split.router import STAGE_OVERHEAD, models_left
from shoal.mesh.split.span_model import SpanModels, advert_catalog
from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan

logger = logging.getLogger(__name__)

WARM_PROMPT_TOKENS = 256
"""Prompt tokens of the typical request a warming plan is made for (memory caps count its context)."""
WARM_MAX_TOKENS = 256
"""Completion tokens of that request."""
RECONSIDER_S = 300.0
"""A (peer, model) pair is planned for again at most this often (the peer's advert may have changed)."""
RELOAD_AFTER_S = 3600.0
"""Something warming prepared that this node unloaded since (an idle stage trimmed, a model past its
keep_alive) is not prepared again for this long: the node's own residency rules judged it not worth
keeping."""
SETTLE_S = 10.0
"""A (peer, model) whose likely part here changed is planned for again only this long after the last time."""
MAX_ENTRIES = 64
"""Most entries `view()` keeps (oldest dropped first)."""
UNBOUNDED = 1 << 50
"""Memory the origin is planned with: it runs the model whole already."""

Kind = Literal["stage", "model"]
Part = tuple[str, tuple[LayerSpan, ...]]
"""A plan's kind and the spans it puts on this node."""


def likely_part(shape: sched.ModelShape, model: str, origin_advert: dict[str, Any], me: sched.Device
                ) -> tuple[sched.PlanKind, list[LayerSpan]]:
    """What a request for `model` at the member advertising `origin_advert` would run on device `me` (this
    node, as that member sees it) if it left the member: `("offload", [whole])`, `("split", [span])`, or
    `("local", [])` when no plan would use `me` (or the advert is unusable). Pure arithmetic
    (`scheduler.plan`)."""
    try:
        origin = advert_device(sched.LOCAL, origin_advert, model, holds=True, trusted=True, rtt_s=0.0,
                               link="host")
    except (ValueError, OverflowError):  # an advert the planner cannot use (as the router skips it)
        return "local", []
    origin = replace(origin, free_memory=UNBOUNDED, total_memory=UNBOUNDED)
    request = sched.Request(WARM_PROMPT_TOKENS, WARM_MAX_TOKENS, overhead_bytes=STAGE_OVERHEAD)
    policy = PolicyConfig(max_memory_share=1.0)  # budgets are what each device advertises already
    try:
        plan = sched.plan(shape, request, origin, [me], policy, kinds=("offload", "split"), prefer=(me.id,))
    except sched.NoPlanError:
        return "local", []
    return plan.kind, [a.span for a in plan.stages if a.device == me.id]


@dataclass
class WarmEntry:
    """One piece of warming: what, for whom, and how it went."""

    model: str
    layers: LayerSpan
    kind: Kind
    """`stage` (a span loaded as an idle stage) or `model` (the whole model, for an offload)."""
    origin: str
    """The peer that has the model in use."""
    state: str = "warming"
    """`warming`, `ready` (loaded), `compiled`, `skipped` (`reason` says why), `dropped` (closed for a newer
    guess) or `unloaded` (unloaded by this node since; not prepared again within `RELOAD_AFTER_S`)."""
    reason: str = ""
    seconds: float | None = None
    at: float = 0.0
    """Unix time of the last change."""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "span": str(self.layers), "kind": self.kind, "origin": self.origin,
                "state": self.state, "reason": self.reason, "seconds": self.seconds, "at": round(self.at, 3)}


class Warming:
    """Prepares, one at a time and in the background, what peers' plans would likely ask of this node.
    `poll()` (the split service's advert loop) starts the next piece of work; `stop()` cancels it."""

    def __init__(self, node: NodeView, mesh: MeshHandle, settings: SplitConfig, *,
                 me: Callable[[str, bool, bool], sched.Device], budget: Callable[[], int],
                 busy: Callable[[], int], refusal: Callable[[], str | None],
                 host_holds: Callable[[str, LayerSpan], bool], host_room: Callable[[], int],
                 prepare: Callable[[str, LayerSpan, str | None], Awaitable[Any]],
                 close_idle: Callable[[str, LayerSpan], Awaitable[bool]], span_models: SpanModels) -> None:
        """`me(model, holds, fetch)`: this node as its own planner sees it; `budget()`: the memory it
        advertises; `busy()`: requests it runs; `refusal()`: why it serves no peer now (None: it does);
        `host_holds`, `host_room`, `prepare`, `close_idle`: its `StageHost`'s; `span_models`: headers of
        models it does not hold."""
        self._node = node
        self._mesh = mesh
        self._settings = settings
        self._me = me
        self._budget = budget
        self._busy = busy
        self._refusal = refusal
        self._host_holds = host_holds
        self._host_room = host_room
        self._prepare = prepare
        self._close_idle = close_idle
        self._span_models = span_models
        self._considered: dict[tuple[str, str], tuple[float, Part | None]] = {}
        """(peer, model) → when it was last planned for and the part here that plan gave."""
        self._shapes: dict[str, sched.ModelShape] = {}
        self._entries: dict[tuple[str, str, str], WarmEntry] = {}
        self._task: asyncio.Task[None] | None = None
        self.paused = ""
        """Why warming waits now (policy, load), or empty."""

    @property
    def enabled(self) -> bool:
        return self._settings.warm_peers_models

    def view(self) -> dict[str, Any]:
        """What `GET /v1/mesh/route` shows: on or off, why it waits, the part each peer's plans would likely
        give this node (`likely`), and each piece of work (`entries`)."""
        likely = [{"origin": origin, "model": model, "kind": part[0], "spans": [str(s) for s in part[1]]}
                  for (origin, model), (_, part) in self._considered.items() if part is not None]
        return {"enabled": self.enabled, "paused": self.paused, "likely": likely,
                "entries": [e.to_dict() for e in self._entries.values()]}

    def poll(self) -> None:
        """Start the next piece of warming, when there is one and nothing else runs (on the event loop): a
        (peer, model) never planned for, or whose likely part here changed (the peer's speed or load moved),
        or last planned over `RECONSIDER_S` ago."""
        if not self.enabled or (self._task is not None and not self._task.done()):
            return
        reason = self._refusal()
        if reason is None and self._busy() > 0:
            reason = "this node is busy with requests"
        self.paused = reason or ""
        if reason is not None:
            return
        now = time.monotonic()
        peers = self._mesh.connected_peers()
        linked = {peer.peer_id for peer in peers}
        for gone in [key for key in self._considered if key[0] not in linked]:  # guesses for departed peers
            del self._considered[gone]
        for peer in peers:
            advert = peer.advert or {}
            catalog = advert_catalog(advert)
            for model in advert_in_use(advert):
                key = (peer.peer_id, model)
                cid = catalog.get(model)
                holds = self._holds(model, cid)
                if not holds and not (cid and self._settings.warm_fetch_spans):
                    continue  # neither the bytes here nor leave to fetch them: nothing to prepare
                part = None
                shape = self._shapes.get(model)
                if shape is not None:
                    try:
                        part = self._likely(shape, model, advert, holds, peer.rtt_s)
                    except (ValueError, OverflowError) as exc:  # an advert the planner cannot use
                        logger.debug("warming: not planning %s for %s: %s", model, peer.peer_id[:12], exc)
                        continue
                last = self._considered.get(key)
                if last is not None and now - last[0] < (RECONSIDER_S if last[1] == part else SETTLE_S):
                    continue  # planned for lately (a changed guess waits a little: speeds and loads wobble)
                self._considered[key] = (now, part)
                self._task = asyncio.get_running_loop().create_task(
                    self._consider(peer.peer_id, dict(advert), model, cid, holds, peer.rtt_s),
                    name=f"warming {model} for {peer.peer_id[:12]}")
                return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # --- one (peer, model) ------------------------------------------------------------------------------

    def _likely(self, shape: sched.ModelShape, model: str, advert: dict[str, Any], holds: bool,
                rtt_s: float | None) -> Part:
        me = replace(self._me(model, holds, not holds), id=self._mesh.identity.peer_id, serves_others=True,
                     free_memory=self._budget(), total_memory=self._budget(), rtt_s=rtt_s or 0.001)
        kind, spans = likely_part(shape, model, advert, me)
        return kind, tuple(spans)

    async def _consider(self, origin: str, advert: dict[str, Any], model: str, cid: str | None, holds: bool,
                        rtt_s: float | None) -> None:
        try:
            await self._warm(origin, advert, model, cid, holds, rtt_s)
        except asyncio.CancelledError:
            raise
        except Exception:  # a task boundary: warming is a head start, never a failure of the node
            logger.exception("warming %s for peer %s failed", model, origin[:12])

    async def _warm(self, origin: str, advert: dict[str, Any], model: str, cid: str | None, holds: bool,
                    rtt_s: float | None) -> None:
        shape = self._shapes.get(model)
        if shape is None:
            found = await self._shape(model, cid, holds)
            if found is None:
                return
            config, weight_bytes = found
            shape = self._shapes[model] = sched.ModelShape.from_config(config, weight_bytes)
        kind, spans = part = self._likely(shape, model, advert, holds, rtt_s)
        self._considered[(origin, model)] = (time.monotonic(), part)
        for span in spans:
            whole = kind == "offload"
            entry = self._entry(model, span, "model" if whole else "stage", origin)
            held = self._model_resident(model) if whole else self._host_holds(model, span)
            if held:  # loaded already (by a request, or by warming before)
                if entry.state not in ("ready", "compiled"):
                    entry.state, entry.reason, entry.at = "ready", "loaded already", time.time()
                continue
            if entry.state in ("ready", "compiled", "unloaded") and time.time() - entry.at < RELOAD_AFTER_S:
                if entry.state == "ready":  # warmed, then unloaded by this node's own rules (idle, room)
                    entry.state, entry.at = "unloaded", time.time()
                    entry.reason = "unloaded by this node since: not prepared again soon"
                continue
            started = time.perf_counter()
            entry.state, entry.at = "warming", time.time()
            why = await (self._warm_model(model, shape) if whole
                         else self._warm_stage(model, span, cid, shape))
            entry.seconds = round(time.perf_counter() - started, 3)
            entry.at = time.time()
            if why in ("ready", "compiled"):
                entry.state, entry.reason = why, ""
                logger.info("warming: %s %s %s here in %.1f s ahead of need (in use at peer %s: a plan there "
                            "would put %s on this node)", "compiled" if why == "compiled" else "loaded",
                            model, "whole" if whole else f"layers {span}", entry.seconds, origin[:12],
                            "an offload" if whole else "a split's stage")
            else:
                entry.state, entry.reason = "skipped", why
                logger.info("warming: %s %s not prepared for peer %s: %s", model,
                            "whole" if whole else f"layers {span}", origin[:12], why)

    def _entry(self, model: str, span: LayerSpan, kind: Kind, origin: str) -> WarmEntry:
        key = (model, str(span), kind)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.pop(next(iter(self._entries)))
            entry = self._entries[key] = WarmEntry(model, span, kind, origin, at=time.time())
        entry.origin = origin
        return entry

    def _model_resident(self, model: str) -> bool:
        """Whether the node's models have `model` loaded or loading (its own preload, a request's load)."""
        if model in self._node.models.loaded_names():
            return True
        for entry in self._node.models.list_models():
            if entry.get("id") == model:
                return (entry.get("shoal") or {}).get("state") in ("loaded", "loading")
        return False

    def _holds(self, model: str, cid: str | None) -> bool:
        for name in (model, cid):
            if name:
                with contextlib.suppress(LookupError):
                    self._node.models.resolve(name)
                    return True
        return False

    async def _shape(self, model: str, cid: str | None, holds: bool) -> tuple[ModelConfig, int] | None:
        """The model's config and file size: from its file's header here, else from the header by CID."""
        if not holds:
            if cid is None:
                return None
            opened = await self._span_models.open(model, cid, self._settings.header_timeout_s)
            return opened.config, opened.weight_bytes
        held = self._node.models.resolve(model if self._holds(model, None) else cid or model)
        from shoal.models.loader import open_model

        return (await asyncio.to_thread(open_model, held.path)).config, held.size

    async def _warm_stage(self, model: str, span: LayerSpan, cid: str | None, shape: sched.ModelShape) -> str:
        """Load `span` as an idle stage; returns `ready` or why not."""
        if self._host_holds(model, span):
            return "ready"
        cap = self._settings.standby_max_mb << 20
        if shape.span_compute_bytes(span) > cap:
            return f"the span is over standby_max_mb ({self._settings.standby_max_mb} MiB)"
        need = shape.span_memory(span, WARM_PROMPT_TOKENS + WARM_MAX_TOKENS, STAGE_OVERHEAD)
        left = models_left(self._node.models.memory())
        if need > left:
            return f"needs {need >> 20} MiB, the models budget has {max(0, left) >> 20} MiB left"
        if self._host_room() <= 0 and not await self._drop_stale(model, span):
            return "no room for another idle stage (keep_idle_stages)"
        await self._prepare(model, span, cid)
        return "ready"

    async def _drop_stale(self, model: str, span: LayerSpan) -> bool:
        """Close the oldest stage this node warmed that no current guess names and no sequence uses."""
        current = {(m, s) for (_, m), (_, part) in self._considered.items() if part for s in part[1]}
        for entry in sorted(self._entries.values(), key=lambda e: e.at):
            key = (entry.model, entry.layers)
            if entry.kind != "stage" or entry.state != "ready" or key in current or key == (model, span):
                continue
            if await self._close_idle(*key):
                entry.state, entry.reason, entry.at = "dropped", "a newer guess needed the room", time.time()
                logger.info("warming: closed idle %s layers %s (no longer likely)", *key)
                return True
        return False

    async def _warm_model(self, model: str, shape: sched.ModelShape) -> str:
        """Load the whole model when the models budget has room for it as it is, else compile it (compiled
        backend); returns `ready`, `compiled` or why neither."""
        models = self._node.models
        if self._model_resident(model):
            return "ready"
        whole = LayerSpan.whole(shape.num_layers)
        need = shape.span_memory(whole, WARM_PROMPT_TOKENS + WARM_MAX_TOKENS, STAGE_OVERHEAD)
        if need <= models_left(models.memory()):
            await models.acquire(model)
            return "ready"
        if self._node.config.models.backend == "tvm":
            await models.compile(model)
            return "compiled"
        return "the models budget has no room for the whole model (nothing to compile on this backend)"
