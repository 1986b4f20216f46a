"""The serving side of a split: this node hosts layer ranges of models for other peers' requests.

`StageHost` is transport-free: the split service feeds it `stage.open` / `stage.close` bodies and tensor
frames, and sends back whatever it returns. A stage (one `Stage` per (model, span), loaded or compiled once
and shared by every sequence on it) holds one KV cache per remote sequence; a sequence is named by the peer
and the u32 the peer chose. Every input is checked before it reaches the model: an unknown sequence, a wrong
dtype, shape or size, or a token id outside the vocabulary is answered with an error frame — never a crash,
and never a change to any KV cache. Compute runs on one worker thread (stages are not thread-safe, and the
event loop must keep answering heartbeats): a dedicated `StageWorker` (`split.stage_worker`) fed by a
`queue.SimpleQueue`, which answers the loop with one `call_soon_threadsafe` (no executor in between). A
decode frame's inputs (a few KiB) are checked on the loop before they are queued, so a bad frame never
reaches the worker and a good one takes exactly one hop there and one back. This node's own part of its
split is a `DirectStage` (`split.hosted`) on a hosted stage.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
from shoal.mesh.p2p.protocol import BinaryFrame
from shoal.mesh.split import wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.held_spans import held_by_cid, over_limit
from shoal.mesh.split.hosted import DirectStage, HostedStage, HostError, check_inputs
from shoal.mesh.split.quota import PeerQuota
from shoal.mesh.split.receipts import Usage, UsageLedger
from shoal.mesh.split.stage_chain import Connect, NextLinks, parse_place
from shoal.mesh.split.stage_sessions import Session, Sessions
from shoal.mesh.split.stage_worker import StageWorker
from shoal.mesh.split.step_lane import StepLane, arm
from shoal.mesh.split.tensor_link import LinkError
from shoal.mesh.split.tensor_link_server import ServerLink
from shoal.models.errors import ContextOverflowError, ModelError
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage

logger = logging.getLogger(__name__)

StageFactory = Callable[[str, LayerSpan, "str | None"], Stage]
"""Blocking: build the stage running `span` of model `name` (whose CID the origin may give, so a node that
does not hold the model can fetch just that span); raises LookupError if the model cannot be found."""
Sizer = Callable[[str, LayerSpan, Stage], int]
"""Blocking: the bytes the just-built stage for (model, span) holds, as the planner counts them."""
Gate = Callable[[], "str | None"]
"""Returns why this node refuses remote work right now (policy, battery), or None to accept."""

CHECK_ON_LOOP_BYTES = 65_536
"""Inputs up to this size (every decode frame) are checked on the event loop (microseconds); larger prefill
inputs are checked on the worker, so the loop never scans megabytes."""


class StageHost:
    """Hosts spans for remote sequences. `stop()` is idempotent and frees every stage."""

    def __init__(self, factory: StageFactory, gate: Gate, *, max_sequences: int = SplitConfig.max_sequences,
                 keep_idle_stages: int = SplitConfig.keep_idle_stages,
                 quota: PeerQuota | None = None, ledger: UsageLedger | None = None,
                 sizer: Sizer | None = None, limit: Callable[[], int] | None = None,
                 link_spin_s: float = SplitConfig.link_spin_us / 1e6, connect_next: Connect | None = None,
                 native_lane: Callable[[], ModuleType | None] = lambda: None) -> None:
        """`quota`: refuse `stage.open` from a peer past its hourly share; every row computed counts.
        `ledger`: issue a usage receipt for each sequence at `stage.close` (in the reply). `sizer`: the bytes
        a built stage holds (`HostedStage.nbytes`); `limit()`: the bytes the hosted stages may hold together —
        past it, idle stages are closed (least recently used first) after each new one is built.
        `link_spin_s`: the worker's poll budget while direct links stream decode steps (`split.arrival`).
        `connect_next`: opens a direct tensor link to a peer for chains (`split.stage_chain`); None: never
        chain. `native_lane()`: the native step lane if it is loaded (`split.native`), else None: steady
        decode steps on direct links then take it (`split.step_lane`)."""
        self._sizer = sizer
        self._limit = limit
        self._ledger = ledger
        self._factory = factory
        self._gate = gate
        self._quota = quota
        self._max_sequences = max_sequences
        self._keep_idle = keep_idle_stages
        self._worker = StageWorker("stage-host", link_spin_s)
        self._hosted: dict[tuple[str, LayerSpan], HostedStage] = {}
        self._last_used: dict[tuple[str, LayerSpan], float] = {}
        """When a sequence last opened on each stage (a standby load: never): the idle stages used least
        recently are closed first."""
        self._loading: dict[tuple[str, LayerSpan], asyncio.Future[HostedStage]] = {}
        self._sessions = Sessions()
        self._next = NextLinks(connect_next)
        self._native_lane = native_lane
        self._next_local = 0
        self._lock = threading.Lock()
        self._stopped = False
        self.calls = 0
        """Tensor frames computed (for tests and metrics)."""
        self.refused = 0
        """Tensor frames answered with an error."""
        self.lane_steps = 0
        """Of `calls`, the decode steps the native step lane took (`split.step_lane`)."""

    @property
    def sequences(self) -> int:
        return len(self._sessions)

    # --- control ------------------------------------------------------------------------------------

    async def open(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """`stage.open`: load (or reuse) the stage and start an empty KV cache for (peer, seq)."""
        if self._stopped:
            raise HostError(wire.REFUSED, "the node is shutting down")
        reason = self._gate()
        if reason is not None:
            raise HostError(wire.REFUSED, reason)
        over = self._quota.refusal(peer) if self._quota is not None else None
        if over is not None:
            raise HostError(wire.QUOTA, over)
        model, span_text, seq = body.get("model"), body.get("span"), body.get("seq")
        if not isinstance(model, str) or not model or len(model) > 200:
            raise HostError(wire.BAD_REQUEST, "stage.open needs a model name")
        if type(seq) is not int or not 0 <= seq < 2**32:
            raise HostError(wire.BAD_REQUEST, "stage.open needs seq, a u32")
        if not isinstance(span_text, str):
            raise HostError(wire.BAD_REQUEST, "stage.open needs span 'a:b'")
        try:
            start, stop = (int(x) for x in span_text.split(":"))
            span = LayerSpan(start, stop)
        except ValueError:
            raise HostError(wire.BAD_REQUEST, f"bad span {span_text!r:.40}") from None
        cid = body.get("cid")
        if cid is not None and (not isinstance(cid, str) or not 0 < len(cid) <= 128 or not cid.isalnum()):
            raise HostError(wire.BAD_REQUEST, "stage.open cid must be a CID string")
        place = parse_place(body)
        if self._sessions.taken(peer, seq):
            raise HostError(wire.BAD_REQUEST, f"sequence {seq} is open already")
        if len(self._sessions) >= self._max_sequences:
            raise HostError(wire.BUSY, f"this node hosts {self._max_sequences} sequences already")
        hosted = await self._stage(model, span, cid)
        self._last_used[hosted.key] = time.monotonic()
        local_id = self.new_local_id()
        hosted.sequences.add(local_id)  # in use from now: no trim closes it while the sequence is added
        try:
            await self._run(hosted.call, hosted.stage.add_sequence, local_id)
        except BaseException:
            hosted.sequences.discard(local_id)
            raise
        session = Session(hosted, local_id, cid or model, time.time(), origin=peer, seq=seq, place=place,
                          feed=local_id)  # unique on this host
        self._sessions.add(session)
        config = hosted.stage.config
        logger.info("hosting %s layers %s for peer %s seq %d", model, span, peer[:12], seq)
        reply: dict[str, Any] = {"span": str(span), "hidden": config.hidden_size, "vocab": config.vocab_size}
        if place.upstream is not None:
            reply["feed"] = session.feed
        if place.next_peer is not None:
            session.chained = reply["chained"] = await self._next.ensure(place.next_peer)
        return reply

    async def close(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        seq = body.get("seq")
        if type(seq) is not int:
            raise HostError(wire.BAD_REQUEST, "stage.close needs seq")
        session = self._sessions.get(peer, seq)
        await self._drop(peer, seq)
        if session is None or self._ledger is None or not session.tokens_in:
            return {}
        span = session.hosted.stage.span
        usage = Usage(self._ledger.log.me, peer, f"stage-{seq}", "stage", session.model,
                      (span.start, span.stop), session.tokens_in, session.tokens_out, session.started,
                      time.time())
        return {"receipt": self._ledger.issue(usage).to_dict()}

    async def peer_lost(self, peer: str) -> None:
        """Free every sequence of a peer that went away (and the chain link to it)."""
        self._next.drop(peer)
        for seq in self._sessions.opened_by(peer):
            await self._drop(peer, seq)

    async def _drop(self, peer: str, seq: int) -> None:
        session = self._sessions.pop(peer, seq)
        if session is None:
            return
        session.hosted.sequences.discard(session.local_id)
        await self._run(session.hosted.call, session.hosted.stage.remove_sequence, session.local_id)
        await self._trim()

    async def _stage(self, model: str, span: LayerSpan, cid: str | None = None) -> HostedStage:
        key = (model, span)
        hosted = self._hosted.get(key) or held_by_cid(self._hosted.values(), cid, span)
        if hosted is not None:  # loaded, under this name or (same CID) another
            return hosted
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[key] = pending
            try:
                loop = asyncio.get_running_loop()
                stage, nbytes = await loop.run_in_executor(None, self._build, model, span, cid)
            except LookupError as exc:
                pending.set_exception(HostError(wire.NO_MODEL, str(exc)))
            except ValueError as exc:  # the request does not fit the model (e.g. layers past its end)
                pending.set_exception(HostError(wire.BAD_REQUEST, str(exc)))
            except ModelError as exc:  # this node cannot build it (compile, file): the origin re-plans
                logger.warning("building %s layers %s failed: %s", model, span, exc)
                pending.set_exception(HostError(wire.INTERNAL, str(exc)))
            except Exception as exc:  # task boundary: report, don't crash the host
                logger.exception("loading %s layers %s failed", model, span)
                pending.set_exception(HostError(wire.INTERNAL, f"loading the stage failed: {exc}"))
            else:
                hosted = HostedStage(key, stage, cid, nbytes)
                self._hosted[key] = hosted
                pending.set_result(hosted)
            finally:
                del self._loading[key]
                if not pending.done():  # this task was cancelled mid-load: release the other waiters
                    pending.set_exception(HostError(wire.INTERNAL, "loading the stage was interrupted"))
            if pending.exception() is None and self._limit is not None:  # (marks it retrieved as well)
                await self.trim_to(self._limit(), keep=key)
        return await asyncio.shield(pending)

    def _build(self, model: str, span: LayerSpan, cid: str | None) -> tuple[Stage, int]:
        """Blocking: the stage and the bytes it holds (0 when they cannot be told: it still serves)."""
        stage = self._factory(model, span, cid)
        try:
            return stage, self._sizer(model, span, stage) if self._sizer is not None else 0
        except Exception:  # sizing is bookkeeping: never fail a built stage for it
            logger.exception("cannot tell the size of %s layers %s", model, span)
            return stage, 0

    @property
    def stages(self) -> list[HostedStage]:
        """The stages loaded here (the advert's `shards`, the memory it offers: `split.held_spans`)."""
        return list(self._hosted.values())

    async def trim_to(self, limit: int, keep: tuple[str, LayerSpan] | None = None) -> int:
        """Close idle stages, least recently used first (never `keep`), until the stages together hold at most
        `limit` bytes or none idle is left; returns how many were closed."""
        victims = over_limit(list(self._hosted.values()), self._last_used, limit, keep)
        for hosted in victims:
            if self._hosted.get(hosted.key) is hosted and hosted.idle:
                del self._hosted[hosted.key]
                self._last_used.pop(hosted.key, None)
                logger.info("closed idle %s layers %s (%d MiB): the stages here held more than the %d MiB "
                            "this node's budget leaves them", hosted.key[0], hosted.key[1],
                            hosted.nbytes >> 20, max(0, limit) >> 20)
                await self._run(hosted.call, hosted.stage.close)
        return len(victims)

    def holds(self, model: str, span: LayerSpan) -> bool:
        """Whether the stage for (model, span) is loaded or loading."""
        return (model, span) in self._hosted or (model, span) in self._loading

    def idle_room(self) -> int:
        """How many more idle stages this host keeps (`keep_idle_stages` less the idle and loading ones)."""
        idle = sum(1 for h in self._hosted.values() if h.idle)
        return self._keep_idle - idle - len(self._loading)

    async def prepare(self, model: str, span: LayerSpan, cid: str | None = None) -> None:
        """Load the stage ahead of need (`split.standby`); it stays as an idle stage (`keep_idle_stages`),
        the first closed when there are too many (it was never used)."""
        if self._stopped:
            return
        hosted = await self._stage(model, span, cid)
        self._last_used.setdefault(hosted.key, 0.0)

    async def close_idle(self, model: str, span: LayerSpan) -> bool:
        """Close the stage for (model, span) when it is loaded and idle (`split.warming` makes room for a
        newer guess this way); True when it was closed."""
        hosted = self._hosted.get((model, span))
        if hosted is None or not hosted.idle:
            return False
        del self._hosted[hosted.key]
        self._last_used.pop(hosted.key, None)
        await self._run(hosted.call, hosted.stage.close)
        return True

    async def direct_stage(self, model: str, span: LayerSpan, cid: str | None = None) -> DirectStage:
        """This node's part of its own split: the hosted stage, called on the caller's thread."""
        if self._stopped:
            raise HostError(wire.REFUSED, "the node is shutting down")
        hosted = await self._stage(model, span, cid)
        self._last_used[hosted.key] = time.monotonic()
        return DirectStage(hosted, self.new_local_id)

    def new_local_id(self) -> int:
        with self._lock:
            self._next_local += 1
            return self._next_local

    async def _trim(self) -> None:
        idle = [h for h in self._hosted.values() if h.idle]
        idle.sort(key=lambda h: self._last_used.get(h.key, 0.0))  # least recently used first
        for hosted in idle[: max(0, len(idle) - self._keep_idle)]:
            del self._hosted[hosted.key]
            self._last_used.pop(hosted.key, None)
            await self._run(hosted.call, hosted.stage.close)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._worker.run(fn, *args)

    # --- tensors ------------------------------------------------------------------------------------

    async def compute(self, peer: str, frame: BinaryFrame) -> BinaryFrame:
        """Run one prefill/decode frame of the data channel; returns the hidden/logits frame, or an error
        frame."""
        try:
            hosted, message, sessions, inputs = self._admit(peer, frame, CHECK_ON_LOOP_BYTES)
            reply = await self._run(self._serve, hosted, message, sessions, inputs)
        except Exception as exc:
            return self._refuse(peer, frame, exc)
        self._count(sessions, message.op, int(message.array.shape[0]) if message.array is not None else 0)
        return reply

    def _count(self, sessions: list[Session], op: str, rows: int) -> None:
        """A call served: count it, its rows per sequence (for the receipts), and its rows (tokens) against
        the origin's quota."""
        self.calls += 1
        for session in sessions:
            session.count(op, rows)
        if self._quota is not None and sessions:
            self._quota.record(sessions[0].origin, rows)

    def serve_link(self, link: ServerLink) -> None:
        """Answer `link`'s tensor frames on the worker from now on (see `mesh.tensor_link`)."""
        self._worker.serve_link(link, self._answer_link)

    def _answer_link(self, link: ServerLink) -> bool:
        """Worker: the frames `link` brought — its origin's calls, or (a chain) the stage before's steps.
        False when the link is done."""
        lane = link.lane
        if lane is not None:
            if lane.current(self._sessions.generation):
                answered = self._lane_step(link, lane)
                if answered is not None:
                    return answered
            link.lane = None  # the generic path below takes the record (and arms the lane again)
        while True:
            try:
                frame = link.read_frame()
            except LinkError as exc:
                logger.info("tensor link of peer %s ends: %s", link.peer[:12], exc)
                return False
            if not self._link_frame(link, frame):
                return False
            if not link.buffered:
                return True

    def _link_frame(self, link: ServerLink, frame: BinaryFrame) -> bool:
        """Worker: compute one frame of a direct link and answer it — on the link, to the origin's link
        (the last stage of a chain), or by passing the output on to the next stage. False: close the link."""
        sessions: list[Session] = []
        try:
            hosted, message, sessions, inputs = self._admit(link.peer, frame, 0, link)
            out, seconds = self._compute(hosted, message, sessions, inputs)
            passing = message.op in wire.CHAIN_OPS and sessions[0].chained
            reply = None if passing else self._encode(hosted.stage, message, out, seconds)
        except Exception as exc:  # the worker's boundary: answered with an error frame, never raised
            return self._answer(link, sessions, self._refuse(link.peer, frame, exc))
        self._count(sessions, message.op, int(message.array.shape[0]) if message.array is not None else 0)
        if self._native_lane() is not None:
            link.lane = arm(frame.payload, message, sessions, out, passing, self._sessions.generation)
        if reply is None:
            return self._pass_on(link, sessions, message, out)
        return self._answer(link, sessions, reply)

    def _lane_step(self, link: ServerLink, lane: StepLane) -> bool | None:
        """Worker: take the link's next record through the native step lane (`split.step_lane`) and answer
        it as `_link_frame` would. None when the record is not the lane's step: `read_frame` returns it."""
        native = self._native_lane()
        taken = link.take_step(native, lane.head, lane.inputs) if native is not None else None
        if taken is None:
            return None
        call, step = taken >> 32, taken & 0xFFFF_FFFF
        session = lane.session
        if lane.op != "forward":
            session.reply_link = link  # as `Sessions.find` does for the origin's own frames
        try:
            out, seconds = lane.hosted.call(self._timed_forward, lane.hosted.stage, lane.op, lane.ids,
                                            lane.inputs)
            self._count([session], lane.op, 1)
            self.lane_steps += 1
            if lane.passing:
                assert session.place.next_peer is not None
                try:
                    self._next.send_native(native, session.place.next_peer, call, lane.out_head, step, out)
                except LinkError as exc:
                    link.lane = None
                    return self._next_lost(link, [session], call, step, exc)
                return True
            target = link if session.origin == link.peer else session.reply_link
            if target is None:  # `current` saw one: it went since
                logger.warning("a chain step from %s has no origin link to answer on", link.peer[:12])
                return True
            try:
                target.send_native(native, call, lane.out_head, step, wire.micros(seconds), out, lane.top_1)
            except LinkError as exc:
                logger.info("answering peer %s: %s", target.peer[:12], exc)
                return target is not link
            return True
        except Exception as exc:  # the worker's boundary, as in `_link_frame`: an error frame, never raised
            link.lane = None
            return self._answer(link, [session], self._refusal(link.peer, call, step, exc))

    def _pass_on(self, link: ServerLink, sessions: list[Session], message: wire.TensorMessage,
                 out: np.ndarray) -> bool:
        """A chain's step goes on to the next stage; if it cannot, the origin hears so (`next_lost`)."""
        place = sessions[0].place
        assert place.next_peer is not None
        try:
            step = wire.encode_input(message.call, "forward", message.step,
                                     [s.place.next_seq for s in sessions], out, message.top_k,
                                     fp16=message.reply_f16)
            self._next.send(place.next_peer, step)
        except (LinkError, ValueError) as exc:
            return self._next_lost(link, sessions, message.call, message.step, exc)
        return True

    def _next_lost(self, link: ServerLink, sessions: list[Session], call: int, step: int, exc: Exception
                   ) -> bool:
        """A chain's step could not go on: the sequences stop chaining and the origin hears `next_lost`."""
        for session in sessions:
            session.chained = False
        text = f"cannot pass the step on to {sessions[0].place.next_peer or '?':.16}: {exc}"
        return self._answer(link, sessions, wire.encode_error(call, step, wire.NEXT_LOST, text))

    def _answer(self, link: ServerLink, sessions: list[Session], reply: BinaryFrame) -> bool:
        """Send `reply` to the origin: on `link`, unless the frame came from a chain's upstream stage (then
        on the origin's own link). False when `link` failed."""
        target = link if not sessions or sessions[0].origin == link.peer else sessions[0].reply_link
        if target is None:
            logger.warning("a chain step from %s has no origin link to answer on", link.peer[:12])
            return True
        try:
            target.send_frame(reply)
        except LinkError as exc:
            logger.info("answering peer %s: %s", target.peer[:12], exc)
            return target is not link
        return True

    def _admit(self, peer: str, frame: BinaryFrame, check_up_to: int, link: ServerLink | None = None
               ) -> tuple[HostedStage, wire.TensorMessage, list[Session], np.ndarray | None]:
        """Decode a tensor frame and find its sequences — the peer's own, or (a `forward` step on a direct
        `link`) the sequences it feeds; inputs up to `check_up_to` bytes are checked here (on the loop),
        larger ones by `_compute` (on the worker). A direct link's frame from the origin makes that link the
        one its sequences answer on. Raises FrameError."""
        message = wire.decode_input(frame)
        found = self._sessions.find(peer, message, link)
        hosted = found[0].hosted
        inputs = None
        if message.array is not None and message.array.nbytes <= check_up_to:
            inputs = check_inputs(hosted.stage, message)
        return hosted, message, found, inputs

    def _refuse(self, peer: str, frame: BinaryFrame, exc: Exception) -> BinaryFrame:
        """The error frame answering a call that failed with `exc`."""
        return self._refusal(peer, frame.request_id, wire.frame_step(frame), exc)

    def _refusal(self, peer: str, call: int, step: int, exc: Exception) -> BinaryFrame:
        self.refused += 1
        if isinstance(exc, wire.FrameError):
            logger.info("peer %s: tensor frame %d refused: %s", peer[:12], call, exc.message)
            return wire.encode_error(call, step, exc.code, exc.message)
        if isinstance(exc, ContextOverflowError | ValueError):
            return wire.encode_error(call, step, wire.BAD_REQUEST, str(exc))
        logger.error("peer %s: stage call failed", peer[:12], exc_info=exc)  # a task boundary
        return wire.encode_error(call, step, wire.INTERNAL, f"stage failed: {exc}")

    def _serve(self, hosted: HostedStage, message: wire.TensorMessage, sessions: list[Session],
               inputs: np.ndarray | None) -> BinaryFrame:
        """Worker thread: compute and encode the reply in one hop: the loop only decodes the frame's header
        and sends the reply."""
        out, seconds = self._compute(hosted, message, sessions, inputs)
        return self._encode(hosted.stage, message, out, seconds)

    def _compute(self, hosted: HostedStage, message: wire.TensorMessage, sessions: list[Session],
                 inputs: np.ndarray | None) -> tuple[np.ndarray, float]:
        """Worker thread: check large inputs (the loop checked small ones: `inputs`) and run the stage; its
        output and compute time."""
        stage = hosted.stage
        if inputs is None:
            inputs = check_inputs(stage, message)
        ids = [s.local_id for s in sessions]
        return hosted.call(self._timed_forward, stage, message.op, ids, inputs)

    @staticmethod
    def _encode(stage: Stage, message: wire.TensorMessage, out: np.ndarray, seconds: float) -> BinaryFrame:
        # the compute time lets the origin tell link time from compute time
        if stage.span.is_last(stage.config.num_layers):
            return wire.encode_logits(message.call, message.step, out, message.top_k, seconds)
        return wire.encode_hidden(message.call, message.step, out, message.reply_f16, seconds)

    @classmethod
    def _timed_forward(
        cls, stage: Stage, op: str, ids: list[int], inputs: np.ndarray
    ) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        out = cls._forward(stage, op, ids, inputs)
        return out, time.perf_counter() - started

    @staticmethod
    def _forward(stage: Stage, op: str, ids: list[int], inputs: np.ndarray) -> np.ndarray:
        if op == "prefill":
            return stage.prefill(ids[0], inputs)
        return stage.decode(ids, inputs)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._sessions.clear()
        self._next.close()
        hosted, self._hosted = list(self._hosted.values()), {}
        for h in hosted:
            try:
                await self._run(h.call, h.stage.close)
            except Exception:  # shutting down: log and go on freeing the rest
                logger.exception("closing stage %s failed", h.key)
        self._worker.stop()


