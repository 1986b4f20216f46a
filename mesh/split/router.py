"""Routing: given a request, ask the scheduler where it runs and return one token stream plus its route.

`Router.stream(served, prompt_ids, params, route)` is what the API's completion handler iterates instead of
`served.engine.stream(...)`. It builds the scheduler's inputs (this node's measured speed and memory budget,
the peers' adverts and RTTs, the policy), runs the plan, and fills in `route` (the request record's
`mesh.route.Route`) as it goes: `kind` (local/offload/split), `peers` and `spans` per stage, `replans`, and
the `predicted` times next to the observed ones. A lost peer is handled here (offload: resume
on a re-planned route from prompt + tokens already streamed) or in `SplitPipeline` (split: rebuild the chain
and replay), so the client sees one stream. The wiring (handlers, adverts, the stage host) is in
`mesh.split_service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import psutil
from shoal.mesh.p2p.errors import PeerUnavailable, RemoteError
from shoal.mesh.p2p.ice import link_path
from shoal.mesh.route import LOCAL_PEER, ObservedTimes, ReplanEntry, Route, RouteChoice, RouteFailed
from shoal.mesh.split import scheduler as sched
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.held_spans import held_of
from shoal.mesh.split.liveness import local_load_report, offload_wait_report, reporting
from shoal.mesh.split.offload import OffloadClient, OffloadEvent, params_to_wire
from shoal.mesh.split.peer_failures import REPLANNABLE, peer_failure
from shoal.mesh.split.pipeline import ChainStage, Replan, SplitPipeline
from shoal.mesh.split.plan_inputs import (
    DEFAULT_TPS,
    ForcedRoute,
    Speeds,
    advert_device,
    advert_models,
)
from shoal.mesh.split.ports import MeshHandle, NodeView, Observed
from shoal.mesh.split.remote_stage import RemoteStage, StageLost
from shoal.mesh.split.span_model import (
    SpanModel,
    SpanModels,
    advert_catalog,
    cid_in_adverts,
)
from shoal.mesh.split.stage_link import DirectLinkFailures, ReceiptSink
from shoal.mesh.split.standby import Standby, remote_loader
from shoal.models.config import ModelConfig
from shoal.models.errors import ModelError
from shoal.models.generate import TokenEvent
from shoal.models.sampling import SamplingParams
from shoal.models.served import Servable
from shoal.models.span import LayerSpan

if TYPE_CHECKING:
    from shoal.mesh.split.remote_embed import RemoteEmbedder
    from shoal.mesh.split.remote_model import RemoteModel
    from shoal.mesh.split.stage_host import StageHost

logger = logging.getLogger(__name__)

FETCH_BPS = 4 * 1024 * 1024
"""Bytes/s assumed for a peer fetching a span it does not hold (blocks over the mesh)."""
GREEDY_TOP_K = 1
"""Logits the last stage returns per row for plain greedy decoding: just the argmax — the lowest id among
ties, as local decoding picks it (`split_wire.encode_logits`), found in ~4 µs where a top-8 took ~60 µs."""
STAGE_OVERHEAD = 16 * 1024 * 1024
"""Bytes of runtime a stage needs beyond weights and KV cache, in the planner's memory check."""
MAX_CONTENDED = 4096
"""Most routes remembered as having run alongside others (their records are observed when they finish)."""




class Router:
    """Plans and runs requests. Owned by `SplitService`; `node` gives models, policy, config."""

    def __init__(self, node: NodeView, mesh: MeshHandle, host: StageHost, offload: OffloadClient,
                 settings: SplitConfig | None = None, *, load: Callable[[], int] | None = None,
                 stage_receipts: ReceiptSink | None = None) -> None:
        """`load()` counts the requests this node is already busy with (its queue depth, for the cost model);
        `stage_receipts` is where a peer's stage hands the receipt of a closed sequence
        (`split.stage_receipts`)."""
        self.node = node
        self.mesh = mesh
        self.host = host
        self.offload = offload
        self.settings = settings or SplitConfig()
        self.speeds = Speeds()
        self.direct_failures = DirectLinkFailures(self.settings.direct_retry_s)
        self.standby = Standby(host.prepare, host.holds, remote_loader(mesh, self.settings), host.idle_room) \
            if self.settings.standby_spans else None
        """Loads the spans a re-plan would put here, while a split runs (`split.standby`)."""
        self._forced: ForcedRoute | None = None
        self.load: Callable[[], int] = load or (lambda: 0)
        self.stage_receipts = stage_receipts
        self.span_models = SpanModels(node)
        """Models this node plans over the mesh without holding them (their headers, by CID)."""
        self.placed: Counter[str] = Counter()
        """Requests this router has placed on each device (`local` or a peer id) that are still running: a
        lower bound on that device's load until its own count (engine, advert) catches up."""
        self._away: dict[str, bool] = {}
        """Per model: whether the last automatic plan left this node (picks the hysteresis margin)."""
        self._contended: set[int] = set()
        """Routes (by id) of local requests that ran alongside others: their speed is not this node's."""

    @property
    def forced(self) -> ForcedRoute | None:
        """The node-wide forced route (tests and benchmarks), or None when the scheduler plans."""
        return self._forced

    def force(self, route: ForcedRoute | None) -> None:
        """Make every request without a route of its own follow `route` (None: the scheduler plans again)."""
        self._forced = route

    # --- the scheduler's inputs ------------------------------------------------------------------------

    def local_device(self, model: str, holds: bool, fetch: bool = False, cid: str | None = None
                     ) -> sched.Device:
        """This node as the planner sees it, with the spans of the model (by name, or `cid`) its stage host
        holds loaded (`Device.held`) and whether its engine has the model loaded (`Device.loaded`, as peers
        read it from its `in_use`); `fetch`: it can fetch spans of a model it does not hold."""
        decode, prefill = self.speeds.get(model)
        cid = cid or self.model_cid(model)
        names = self.node.models.loaded_names()
        memory = psutil.virtual_memory()
        busy = max(0, self.load(), self.placed[sched.LOCAL])
        battery = None
        with contextlib.suppress(OSError, RuntimeError, AttributeError):
            b = psutil.sensors_battery()
            if b is not None:
                battery = (float(b.percent), bool(b.power_plugged))
        return sched.Device(
            sched.LOCAL, decode or DEFAULT_TPS, prefill, int(memory.available), int(memory.total),
            fetch_bps=FETCH_BPS if fetch and not holds else 0.0,
            holds_model=holds, queue_depth=busy, battery=battery[0] if battery else None,
            charging=battery[1] if battery else False, measured=decode > 0,
            batch_cost=self.speeds.batch_cost(model), batch_steps=self.speeds.batch_steps(model),
            held=held_of(self.host.stages, model, cid),
            loaded=model in names or (cid is not None and any(self.model_cid(n) == cid for n in names)),
        )

    def model_cid(self, model: str) -> str | None:
        try:
            return self.node.models.resolve(model).cid or None
        except LookupError:
            return None

    def models_room(self) -> int:
        """Bytes left in this node's budget for loaded models (`[models] memory_budget_mb` less what the
        loaded models and the spans in use on its stage host take): what it can still take on, for a span or
        a model of its own."""
        return models_left(self.node.models.memory())

    def served_cid(self, served: Servable) -> str | None:
        """The CID stages fetch `served` by: a span model's own, else the local catalog's."""
        return served.cid if isinstance(served, SpanModel) else self.model_cid(served.name)

    def peer_devices(self, model: str, cid: str | None = None, num_layers: int = 0) -> list[sched.Device]:
        """The scheduler's view of the linked peers: those that advertise `model` (by name, or its `cid` in
        their `catalog`), and — when the model's CID is known — those that serve others and could fetch a
        span of it (bad adverts are skipped); given the model's `num_layers`, with the spans of it each holds
        loaded."""
        devices = []
        trusted = set(self.mesh.config.allow)
        cid = cid or self.model_cid(model)
        can_fetch = cid is not None
        for peer in self.mesh.connected_peers():
            advert = peer.advert or {}
            holds = model in advert_models(advert) or (
                cid is not None and cid in advert_catalog(advert).values())
            if not holds and not can_fetch:
                continue
            try:
                devices.append(advert_device(
                    peer.peer_id, advert, model, holds=holds, trusted=peer.peer_id in trusted,
                    rtt_s=peer.rtt_s or 0.001, link=(link_path(peer.pc) or {}).get("type", "host"),
                    placed=self.placed[peer.peer_id], fetch_bps=0.0 if holds else FETCH_BPS,
                    offload_link=self.offload.links_to(peer), cid=cid, num_layers=num_layers))
            except (ValueError, OverflowError) as exc:
                logger.info("ignoring %s's advert for planning: %s", peer.peer_id[:12], exc)
        return devices

    def peer_ids(self, names: tuple[str, ...]) -> list[str]:
        """Peer ids for ids or names a request lists (`prefer`/`avoid`), in order; unknown ones are kept as
        given (they match nothing)."""
        by_name = {p.name: p.peer_id for p in self.mesh.connected_peers() if p.name}
        return list(dict.fromkeys(by_name.get(n, n) for n in names))

    def plan(self, model: str, config: ModelConfig, weight_bytes: int, holds: bool, prompt_tokens: int,
             max_tokens: int, exclude: frozenset[str] = frozenset(), choice: RouteChoice | None = None,
             cid: str | None = None) -> sched.Plan:
        """`holds`: this node runs the model whole; `cid` (a `SpanModel`): it does not, but this node's stages
        and its peers' can fetch spans of it by this CID."""
        choice = choice or RouteChoice()
        if self.forced is not None and not exclude and choice.mode in ("auto", self.forced.kind):
            return self.forced.to_plan(config.num_layers)
        exclude = exclude | frozenset(self.peer_ids(choice.avoid))
        kinds = None if choice.mode == "auto" else (choice.mode,)
        shape = sched.ModelShape.from_config(config, weight_bytes)
        request = sched.Request(prompt_tokens, max_tokens, overhead_bytes=STAGE_OVERHEAD)
        local = self.local_device(model, holds, fetch=cid is not None, cid=cid)
        policy = self.node.policy
        # the local share cap is this node's own business; peers advertise the budget they offer. A model
        # not loaded here also has only the room left in the loaded models' budget ([models] memory_budget_mb)
        budget = local.memory_budget(policy)
        if not holds:
            budget = min(budget, self.models_room())
        local = replace(local, free_memory=budget, total_memory=local.free_memory)
        peers = self.peer_devices(model, cid, config.num_layers)
        # the offloads this node runs now relay their tokens through its CPU (cost_model.relay_share)
        local = replace(local, relay_share=sched.relay_share((self.placed[p.id], p) for p in peers))
        planning = replace(policy, max_memory_share=1.0, prefer_local=policy.prefer_local or policy.metered)
        automatic = choice.mode == "auto" and not choice.prefer
        settings = self.settings
        gain = settings.stay_gain_percent if self._away.get(model) else settings.offload_gain_percent
        stages = 3 if holds or cid else 1
        chosen = sched.plan(shape, request, local if holds or choice.mode != "local" else None, peers,
                            planning, exclude=exclude,
                            max_stages=stages, kinds=kinds, prefer=self.peer_ids(choice.prefer),
                            margin=gain / 100 if automatic and holds else 0.0,
                            chain=settings.chain_stages and settings.direct_tensors)
        if automatic and holds and not exclude:
            self._away[model] = chosen.kind != "local"
        where = [(a.device[:12], str(a.span)) for a in chosen.stages]
        logger.info("plan for %s (%d+%d tokens): %s %s, predicted ttft %.3f s, %.4f s/token; loads %s%s",
                    model, prompt_tokens, max_tokens, chosen.kind, where, chosen.prediction.ttft_s,
                    chosen.prediction.per_token_s,
                    {d.id[:12]: d.queue_depth for d in [local, *peers] if d.queue_depth},
                    "; " + "; ".join(chosen.notes) if chosen.notes else "")
        return chosen

    # --- running ------------------------------------------------------------------------------------------

    async def stream(self, served: Servable, prompt_ids: list[int], params: SamplingParams,
                     route: Route, choice: RouteChoice | None = None) -> AsyncIterator[TokenEvent]:
        """Token events for one request, from wherever the plan says (within `choice`, the request's own
        routing wishes); `route` is filled in as it goes. A request no device can take, or whose peers all
        refused or failed, raises `RouteFailed` (the API answers with its status and code)."""
        model = served.name
        choice = choice or RouteChoice()
        config, weight_bytes = self.shape(served)
        max_tokens = _planned_tokens(served, prompt_ids, params)
        holds = served.engine is not None
        span_cid = served.cid if isinstance(served, SpanModel) else None
        if choice.mode == "local" and not holds:
            raise RouteFailed(503, "no_route", f"{model} is not held by this node, so it cannot run locally")
        try:
            plan = self.plan(model, config, weight_bytes, holds, len(prompt_ids), max_tokens, choice=choice,
                             cid=span_cid)
        except sched.NoPlanError as exc:
            if not holds or choice.mode != "auto":
                raise RouteFailed(503, exc.code, f"{model}: {exc}") from None
            # the model is loaded here already: serve it rather than refuse (the budget is a planning aid)
            logger.warning("%s: %s; running locally anyway", model, exc)
            whole = sched.Assignment(sched.LOCAL, LayerSpan.whole(config.num_layers))
            plan = sched.Plan("local", (whole,), sched.Prediction(0.0, 0.0, 0.0), ("over budget",))
        _follow(route, plan)
        if plan.kind != "offload" and not holds and span_cid is None:
            raise RouteFailed(503, "no_route", f"{model} is not held by this node: it can only be offloaded")
        placed = plan.devices
        self.placed.update(placed)  # before any await: the next request plans with this one counted
        if len(self._contended) > MAX_CONTENDED:  # routes whose record was never observed (failed requests)
            self._contended.clear()
        if plan.kind == "local" and self.placed[sched.LOCAL] + self.load() > 1:
            self._contended.add(id(route))
        try:
            async with contextlib.aclosing(self._run(served, plan, config, weight_bytes, prompt_ids, params,
                                                     max_tokens, route, choice)) as events:
                async for event in events:
                    yield event
        finally:
            if plan.kind == "local" and max(self.load(), self.placed[sched.LOCAL]) > 1:
                self._contended.add(id(route))
            self.placed.subtract(placed)
            self.placed += Counter()  # drop the zero counts

    async def _run(self, served: Servable, plan: sched.Plan, config: ModelConfig, weight_bytes: int,
                   prompt_ids: list[int], params: SamplingParams, max_tokens: int, route: Route,
                   choice: RouteChoice) -> AsyncIterator[TokenEvent]:
        model = served.name
        if plan.kind == "local" and served.engine is not None:
            source = served.engine.stream(prompt_ids, params)
        elif plan.kind == "offload":
            source = self._offload(served, plan, config, weight_bytes, prompt_ids, params, max_tokens, route,
                                   choice)
        else:
            source = self._split(served, plan, config, prompt_ids, params, route, choice)
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        try:
            async with contextlib.aclosing(source) as events:
                async for event in events:
                    tokens += 1
                    if first is None:
                        first = time.perf_counter() - started
                    yield event
        except (StageLost, RemoteError) as exc:  # a split's recovery gave up, or a peer's error ends it
            raise peer_failure(exc) from None
        seconds = time.perf_counter() - started
        per_token = (seconds - first) / (tokens - 1) if first is not None and tokens > 1 else None
        times = ObservedTimes(first, seconds, per_token)
        route.measured(times)
        observed = times.to_dict()
        logger.info("%s via %s: predicted ttft %.3f s + %.4f s/token, observed ttft %s s + %s s/token",
                    model, plan.kind, plan.prediction.ttft_s, plan.prediction.per_token_s,
                    observed["ttft_s"], observed["per_token_s"])

    async def _offload(self, served: Servable, plan: sched.Plan, config: ModelConfig, weight_bytes: int,
                       prompt_ids: list[int], params: Any, max_tokens: int, route: Route,
                       choice: RouteChoice) -> AsyncIterator[Any]:
        emitted: list[int] = []
        excluded: set[str] = set()
        while True:
            peer = plan.stages[0].device
            if plan.kind == "local":
                source = served.engine.stream(prompt_ids + emitted, replace(params, max_tokens=max_tokens
                                                                             - len(emitted)))
            elif plan.kind == "offload":
                body = params_to_wire(params, max_tokens - len(emitted))
                source = self.offload.stream(peer, served.name, prompt_ids + emitted, body,
                                             self.model_cid(served.name), offload_wait_report(route, peer))
            else:
                raise StageLost(peer, "a re-planned offload may only go local or to another peer")
            try:
                async with contextlib.aclosing(source) as events:
                    async for event in events:
                        emitted.append(event.token_id)
                        yield OffloadEvent(event.token_id, event.text, len(emitted) - 1, len(prompt_ids),
                                           len(emitted), event.finish_reason, event.logprobs,
                                           event.stop_sequence)
                return
            except (StageLost, RemoteError) as exc:
                if isinstance(exc, RemoteError) and exc.code not in REPLANNABLE:
                    raise peer_failure(exc, peer) from None
                if len(excluded) >= self.settings.max_replans:
                    raise peer_failure(exc, peer) from None
                logger.warning("offload to %s failed after %d tokens: %s; re-planning without it", peer[:12],
                               len(emitted), exc)
                excluded.add(peer)
                # the stream resumes on another peer's engine or this node's own, never through a fresh
                # pipeline (not wired): a node without the model plans another offload only
                resume = choice if served.engine is not None else replace(choice, mode="offload")
                try:
                    plan = self.plan(served.name, config, weight_bytes, served.engine is not None,
                                     len(prompt_ids) + len(emitted), max(1, max_tokens - len(emitted)),
                                     frozenset(excluded), resume, self._span_cid(served))
                except sched.NoPlanError:
                    raise peer_failure(exc, peer) from None
                if plan.kind == "split":  # resuming through a fresh pipeline is not wired for offloads yet
                    whole = LayerSpan.whole(config.num_layers)
                    plan = sched.Plan("local", (sched.Assignment(sched.LOCAL, whole),), plan.prediction)
                route.replanned()
                _follow(route, plan)
                where = "this node" if plan.kind == "local" else f"peer {plan.stages[0].device[:12]}"
                route.progress(f"peer {peer[:12]} was lost after {len(emitted)} tokens; resuming on {where}",
                               waiting="recovery", peer=peer)

    async def _split(self, served: Servable, plan: sched.Plan, config: ModelConfig, prompt_ids: list[int],
                     params: SamplingParams, route: Route, choice: RouteChoice) -> AsyncIterator[Any]:
        from shoal.models.generate import Engine

        loop = asyncio.get_running_loop()
        _, weight_bytes = self.shape(served)
        top_k = logits_top_k(params, self.settings.top_k_logits)

        cid = self.served_cid(served)

        async def make_stages(p: sched.Plan) -> list[ChainStage]:
            """This node's part runs in-thread (`DirectStage`); peers' parts are `RemoteStage`s."""
            stages: list[ChainStage] = []
            try:
                for a in p.stages:
                    if a.device == sched.LOCAL:
                        try:
                            loading = self.host.direct_stage(served.name, a.span, cid)
                            stages.append(await reporting(loading, local_load_report(route, a.span)))
                        except RemoteError as exc:
                            if exc.code == "bad_request":
                                raise
                            raise StageLost(sched.LOCAL, str(exc)) from None  # re-plan without this node
                        continue
                    try:
                        link = self.mesh.peer(a.device)
                    except PeerUnavailable as exc:
                        raise StageLost(a.device, str(exc)) from None
                    stages.append(RemoteStage(link, loop, served.name, config, a.span,
                                              settings=self.settings, top_k=top_k,
                                              fp16=self.settings.fp16_hidden, cid=cid,
                                              direct=self.settings.direct_tensors,
                                              on_receipt=self.stage_receipts,
                                              direct_failures=self.direct_failures,
                                              progress=route.progress))
            except BaseException:
                for stage in stages:
                    await loop.run_in_executor(None, stage.close)
                raise
            return stages

        async def replan_and_build(excluded: frozenset[str]) -> list[ChainStage]:
            new_plan = await self._replan(served, config, weight_bytes, prompt_ids, params, excluded, choice)
            _follow(route, new_plan)
            return await make_stages(new_plan)

        def rebuild(excluded: frozenset[str]) -> list[ChainStage]:
            """Blocking (the pipeline calls it from the engine's thread): re-plan and open the new stages."""
            future = asyncio.run_coroutine_threadsafe(replan_and_build(excluded), loop)
            return future.result(self.settings.rebuild_timeout_s)

        def on_replan(event: Replan) -> None:
            route.replanned(ReplanEntry(event.lost, event.at_tokens, event.seconds, event.phases))
            route.follow("split", event.stages, route.predicted or {})

        def replace(span: LayerSpan, excluded: frozenset[str]) -> ChainStage | None:
            """Blocking: this node's own stage for a lost stage's span (its loaded standby when there is one);
            None when this node cannot take it (the pipeline then re-plans the whole chain)."""
            if sched.LOCAL in excluded or served.engine is None:
                return None
            future = asyncio.run_coroutine_threadsafe(self.host.direct_stage(served.name, span, cid), loop)
            try:
                return future.result(self.settings.rebuild_timeout_s)
            except Exception as exc:  # a task boundary: any failure means "re-plan instead"
                logger.info("no local stage for layers %s: %s", span, exc)
                return None

        try:
            stages = await make_stages(plan)
        except StageLost as exc:  # a planned peer left before the request started
            stages = await replan_and_build(frozenset({exc.peer}))
        self._want_standby(served, config, weight_bytes, len(prompt_ids), _planned_tokens(served, prompt_ids,
                           params), [(s.peer, s.span) for s in stages], choice, cid)
        pipeline = SplitPipeline(config, stages, rebuild, max_replans=self.settings.max_replans,
                                 on_replan=on_replan, progress=route.progress, replace=replace,
                                 chain=self.settings.chain_stages)
        engine = Engine([pipeline], served.tokenizer, max_batch=1)
        await engine.start()
        try:
            async with contextlib.aclosing(engine.stream(prompt_ids, params)) as events:
                async for event in events:
                    yield event
        finally:
            await engine.stop()
            route.timed(pipeline.timings())
            await loop.run_in_executor(None, pipeline.close)

    def _want_standby(self, served: Servable, config: ModelConfig, weight_bytes: int, prompt_tokens: int,
                      max_tokens: int, stages: list[tuple[str, LayerSpan]], choice: RouteChoice,
                      cid: str | None) -> None:
        """Queue for loading the spans a lost remote stage would need: first its own span here (the
        pipeline patches a lost stage with this node's stage for it), then what a re-plan without its peer
        would put here or on other peers."""
        if self.standby is None:
            return
        cap = self.settings.standby_max_mb << 20
        remote = [(peer, span) for peer, span in stages if peer != LOCAL_PEER]
        if served.engine is not None:
            for _, span in remote:
                if weight_bytes * len(span) // config.num_layers <= cap:
                    self.standby.want(served.name, span, cid, LOCAL_PEER)
        for peer in dict.fromkeys(p for p, _ in remote):
            try:
                alt = self.plan(served.name, config, weight_bytes, True, prompt_tokens, max_tokens,
                                frozenset({peer}), choice, self._span_cid(served))
            except sched.NoPlanError:
                continue
            for a in alt.stages:  # an offload re-plans as one whole-model stage on that peer
                if weight_bytes * len(a.span) // config.num_layers <= cap:
                    where = LOCAL_PEER if a.device == sched.LOCAL else a.device
                    self.standby.want(served.name, a.span, cid, where)

    async def _replan(self, served: Servable, config: ModelConfig, weight_bytes: int, prompt_ids: list[int],
                      params: SamplingParams, excluded: frozenset[str], choice: RouteChoice) -> sched.Plan:
        max_tokens = _planned_tokens(served, prompt_ids, params)
        try:
            plan = self.plan(served.name, config, weight_bytes, served.engine is not None, len(prompt_ids),
                             max_tokens, excluded, choice, self._span_cid(served))
        except sched.NoPlanError as exc:
            raise StageLost(sorted(excluded)[0] if excluded else sched.LOCAL, str(exc)) from None
        if plan.kind != "split":  # the pipeline needs stages: run a local or offload plan as stages
            whole = LayerSpan.whole(config.num_layers)
            device = plan.stages[0].device
            plan = sched.Plan("split", (sched.Assignment(device, whole),), plan.prediction)
        return plan

    @staticmethod
    def _span_cid(served: Servable) -> str | None:
        return served.cid if isinstance(served, SpanModel) else None

    def shape(self, served: Servable) -> tuple[Any, int]:
        """(ModelConfig, file bytes) of a served model."""
        config = served.config
        size = served.weight_bytes
        if not size:
            try:
                size = self.node.models.resolve(served.name).size
            except LookupError:
                size = 0
        return config, size or 100 * 1024 * 1024

    async def remote_model(self, name: str) -> RemoteModel | SpanModel | None:
        """A stand-in for a model this node does not hold, or holds but cannot load within its budget (None if
        no peer has it): a `SpanModel` when its CID is known (this node's catalog, or peers' adverts) — the
        planner then offloads it to a member that can hold it, or splits it over members whose budgets
        together can, each stage reading or fetching its own layers — else a `RemoteModel` (tokenizer and
        shape asked of a peer that serves it)."""
        from shoal.mesh.split.remote_model import find_remote_model

        adverts = [peer.advert or {} for peer in self.mesh.connected_peers()]
        cid = self.model_cid(name) or cid_in_adverts(name, adverts)
        failed: ModelError | None = None
        if cid is not None:
            try:
                return await self.span_models.open(name, cid, self.settings.header_timeout_s)
            except ModelError as exc:  # no header from the mesh: a peer that serves it may still take it
                logger.warning("%s: %s", name, exc)
                failed = exc
        policy = self.node.policy
        peers = [d for d in self.peer_devices(name)
                 if d.holds_model and d.serves_others and (d.trusted or not policy.trusted_only_splits)
                 and not d.below_battery_floor(policy)]
        peers.sort(key=lambda d: (-d.decode_tps / d.load_factor, d.rtt_s))
        found = await find_remote_model(self.mesh, name, [d.id for d in peers], self.settings)
        if found is None and failed is not None:
            raise RouteFailed(503, "peer_unreachable", f"{name} ({cid}) is held in the mesh, but {failed}")
        return found

    async def remote_embedder(self, name: str, dim: int) -> RemoteEmbedder | None:
        """Embeds `name` (`dim` wide) through a peer that holds it, for a node without it (`remote_embed`)."""
        from shoal.mesh.split.remote_embed import pick_embedder

        return pick_embedder(self.mesh, name, dim, self.peer_devices(name), self.node.policy, self.settings)

    def observe(self, model: str, record: Observed) -> None:
        """Feed a finished local request's timings into the advertised speed."""
        contended = id(record.route) in self._contended
        self._contended.discard(id(record.route))
        if record.route.kind == "local" and not contended:
            self.speeds.observe(model, record.prompt_tokens, record.ttft_s, record.tok_s)


def models_left(memory: dict[str, int]) -> int:
    """What a `NodeModels.memory()` reading leaves for one more model or span: its budget less the loaded
    models and the spans in use on the stage host (`hosted`)."""
    return max(0, int(memory["budget"]) - int(memory["used"]) - int(memory.get("hosted", 0)))


def _planned_tokens(served: Servable, prompt_ids: list[int], params: SamplingParams) -> int:
    """Completion tokens the plan budgets for: the request's max_tokens (the API always sets it), else the
    rest of the context. Plans are sized by it; the engine that runs the request (this node's, a peer's for an
    offload, the split pipeline's) enforces the context itself."""
    return params.max_tokens or max(1, served.context_length - len(prompt_ids))


def logits_top_k(params: SamplingParams, configured: int) -> int:
    """How many logits per row the last stage of a split returns for a request with sampling `params`
    (0: the whole row). Plain greedy needs only the argmax; penalties (which move seen tokens) keep the
    configured k; sampling keeps every logit unless its own top-k fits within the configured one; a grammar
    constraint or logprobs need the whole row."""
    if params.constraint is not None or params.logprobs is not None:
        return 0
    if params.plain_greedy:
        return min(configured, GREEDY_TOP_K)
    if params.greedy:  # with penalties, which move seen tokens
        return configured
    if params.top_k == 0 or params.top_k > configured:
        return 0
    return configured


def _follow(route: Route, plan: sched.Plan) -> None:
    stages = [(a.device if a.device != sched.LOCAL else LOCAL_PEER, str(a.span)) for a in plan.stages]
    route.follow(plan.kind, stages, plan.prediction.to_dict())
