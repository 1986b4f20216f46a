"""`RemoteStage`: the `models.stage.Stage` protocol over a link to the peer that runs the span.

- `StageLink`: what a stage needs from a link — `p2p.peer.Peer` satisfies it (the in-process tests' fake,
  `tests/mesh/stage_links.py`, hands calls straight to a `StageHost`).
- The `Engine` calls stages from an executor thread; each blocking method bridges to the node's event loop
  with `asyncio.run_coroutine_threadsafe(...).result(timeout)`, except tensor calls over a direct tensor link
  (`split.tensor_link`, opened at the first `add_sequence` when the peer's API address is reachable), which
  the calling thread makes on the socket itself. A link that closes, times out or answers with an error
  raises `StageLost` naming the peer. Timeouts come from `[split]` (`SplitConfig`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from shoal.mesh.p2p.errors import MeshError, PeerUnavailable, RemoteError, RequestTimeout
from shoal.mesh.p2p.protocol import TENSOR, BinaryFrame
from shoal.mesh.split import native, wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.liveness import (
    REPORT_EVERY_S,
    PeerSilent,
    Watch,
    await_reply,
    heard_from,
    max_probe_s,
)
from shoal.mesh.split.stage_link import (
    DirectLinkFailures,
    LinkTiming,
    Progress,
    ReceiptSink,
    StageLink,
    StageSeen,
    direct_host,
)
from shoal.mesh.split.tensor_link import (
    TENSOR_LINK,
    Answer,
    ChainLinkError,
    LinkError,
    NativeCall,
    TensorLinkClient,
    call_chain,
)
from shoal.models import idle
from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan
from shoal.models.stage import StageDefaults

logger = logging.getLogger(__name__)

BRIDGE_GRACE_S = 1.0
"""How much longer than a call's own timeout a thread waits on the loop for it (the call times out first)."""
_wire_seqs = itertools.count(int.from_bytes(os.urandom(3), "little") << 4)


def next_wire_seq() -> int:
    """A u32 sequence id for `stage.open`, unique within this process."""
    return next(_wire_seqs) % 2**32


MAX_LANE_HEADS = 64
"""Frame headers a remote stage keeps for the native step lane (one per sequence and input shape in use)."""


class StageLost(PeerUnavailable):
    """A stage's peer went away (link closed, timed out, or failed the call); `peer` says which."""

    def __init__(self, peer: str, message: str, code: str | None = None) -> None:
        super().__init__(f"stage on {peer[:16]} lost: {message}")
        self.peer = peer
        self.code = code
        """The peer's error code when it refused (`refused`, `quota`, `busy`, ...), else None."""


class RemoteStage(StageDefaults):
    """Layers `span` of `model`, run by the node behind `link`. Blocking methods; call them off the loop."""

    waits_on_peers = True
    """A call sends and then blocks on the peer: it runs the caller's deferred work in between
    (`models.idle`)."""

    def __init__(self, link: StageLink, loop: asyncio.AbstractEventLoop, model: str, config: ModelConfig,
                 span: LayerSpan, *, settings: SplitConfig | None = None, top_k: int = wire.DEFAULT_TOP_K,
                 fp16: bool = False, cid: str | None = None, direct: bool = False,
                 on_receipt: ReceiptSink | None = None, direct_failures: DirectLinkFailures | None = None,
                 progress: Progress | None = None) -> None:
        """`on_receipt`: called (on this thread) with what the origin saw of a sequence and the receipt the
        peer returned when the sequence closes; it must not block (the router hands it to the loop).
        `direct_failures`: where addresses that did not connect are remembered (skipped while recent).
        `progress`: told each second while the peer opens the stage (it may load, fetch or compile it)."""
        span.check(config.num_layers)
        self.link = link
        self.peer = link.peer_id
        self.config = config
        self.span = span
        self.model = model
        self._loop = loop
        self._settings = settings = settings or SplitConfig()
        self._timeout = settings.stage_timeout_s
        self._open_timeout = settings.open_timeout_s
        self._cid = cid
        self._per_token = settings.per_token_timeout_s
        self._top_k = top_k
        self._fp16 = fp16
        self._wire: dict[int, int] = {}
        self._lengths: dict[int, int] = {}
        self._prefilled: dict[int, int] = {}
        self._on_receipt = on_receipt
        self._step = 0
        self._closed = False
        self._want_direct = self._direct_wanted = direct
        self._direct_failures = direct_failures
        self._direct: TensorLinkClient | None = None
        self._progress = progress
        self._watch = Watch.from_config(settings)
        self._clock = self._watch.clock()
        """The usual time of this stage's calls: a call silent for much longer makes the origin ping it."""
        self._call_started = 0.0
        self._probed_at = 0.0
        self.timing = LinkTiming()
        self.feeder: str | None = None
        """A chain (`split.pipeline.link_chain`): the peer of the stage before this one, which may feed this
        stage's sequences their decode steps."""
        self.next_stage: RemoteStage | None = None
        """A chain: the stage after this one, to which this stage's peer passes its decode steps on."""
        self._chained: set[int] = set()
        """Sequences whose decode steps this stage's peer passes on to `next_stage` (it linked to it)."""
        self._feeds: dict[int, int] = {}
        """A chain: the id the stage before this one names each sequence by (this stage's peer chose it)."""
        self._lane_heads: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
        """Steady steps' frame and answer headers for the native step lane (`_native_call`), by what they
        describe."""

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float,
              report: Callable[[float], None] | None = None, sent: Callable[[], None] | None = None) -> Any:
        """`coro`'s result, run on the loop; `report(seconds)` each second while it runs (when given);
        `sent()` once the coroutine is handed to the loop, before the wait."""
        if threading.get_ident() == getattr(self._loop, "_thread_id", None):
            coro.close()
            raise RuntimeError("RemoteStage methods block; call them from an executor thread")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        if sent is not None:
            sent()
        try:
            if report is None:
                return future.result(timeout + BRIDGE_GRACE_S)
            began = time.monotonic()
            while True:
                left = timeout + BRIDGE_GRACE_S - (time.monotonic() - began)
                try:
                    return future.result(max(0.0, min(REPORT_EVERY_S, left)))
                except TimeoutError:
                    if left <= REPORT_EVERY_S:
                        raise
                    report(time.monotonic() - began)
        except TimeoutError:
            future.cancel()
            raise StageLost(self.peer, f"no answer within {timeout:.0f} s") from None
        except (PeerUnavailable, RequestTimeout, PeerSilent) as exc:
            raise StageLost(self.peer, str(exc)) from None
        except RemoteError as exc:
            if exc.code in (wire.BAD_TENSOR, wire.BAD_REQUEST):
                raise ValueError(f"stage on {self.peer[:16]} refused the call: {exc.message}") from None
            raise StageLost(self.peer, str(exc), exc.code) from None
        except MeshError as exc:
            raise StageLost(self.peer, str(exc)) from None

    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._wire:
            raise ValueError(f"sequence {seq_id} exists already")
        wire_seq = next_wire_seq()
        body: dict[str, Any] = {"model": self.model, "span": str(self.span), "seq": wire_seq}
        if self._cid:
            body["cid"] = self._cid  # lets a peer without the model fetch just this span
        if self.feeder is not None:
            body["from"] = self.feeder
        after = self.next_stage
        if after is not None and after.transport == "direct" and seq_id in after._feeds:
            body["next"] = {"peer": after.peer, "seq": after._feeds[seq_id]}
        # the first open of a span loads (or compiles) it on the peer: allow for that
        opening = self.link.request(wire.STAGE_OPEN, body, self._open_timeout)
        reply = self._call(opening, self._open_timeout, self._report_open if self._progress else None)
        if reply.get("hidden") != self.config.hidden_size or reply.get("vocab") != self.config.vocab_size:
            raise StageLost(self.peer, f"serves a different model shape: {reply}")
        self._wire[seq_id] = wire_seq
        self._lengths[seq_id] = 0
        self._prefilled[seq_id] = 0
        if reply.get("chained") is True:
            self._chained.add(seq_id)
        feed = reply.get("feed")
        if self.feeder is not None and type(feed) is int and 0 <= feed < 2**32:
            self._feeds[seq_id] = feed
        if self._want_direct:
            self._want_direct = False  # one try per stage
            self._direct = self._open_direct()

    def _report_open(self, seconds: float) -> None:
        assert self._progress is not None
        self._progress(f"waiting for peer {self.peer[:12]} to load layers {self.span} ({seconds:.0f} s)",
                       waiting="peer_load", peer=self.peer, layers=str(self.span), seconds=round(seconds, 1))

    def _open_direct(self) -> TensorLinkClient | None:
        """A direct tensor link to the peer when its API address is reachable (see `mesh.tensor_link`), or
        None: the calls then go over the data channel."""
        host = direct_host(self.link)
        if host is None:
            return None
        failures = self._direct_failures
        if failures is not None and failures.recent(self.peer, host):
            logger.debug("direct tensor link to %s at %s failed recently; using the data channel",
                         self.peer[:12], host)
            return None
        try:
            wait = self._settings.control_timeout_s
            grant = self._call(self.link.request(TENSOR_LINK, {}, wait), wait)
            client = TensorLinkClient.connect(host, grant, self._settings.link_handshake_timeout_s,
                                              self._settings.link_record_timeout_s,
                                              self._settings.link_spin_us / 1e6)
        except (StageLost, ValueError, LinkError) as exc:
            logger.info("no direct tensor link to %s (%s); using the data channel", self.peer[:12], exc)
            if failures is not None and isinstance(exc, LinkError):
                failures.failed(self.peer, host)
            return None
        if failures is not None:
            failures.connected(self.peer, host)
        logger.info("direct tensor link to %s at %s", self.peer[:12], host)
        return client

    def remove_sequence(self, seq_id: int) -> None:
        wire_seq = self._wire.pop(seq_id, None)
        self._chained.discard(seq_id)
        self._feeds.pop(seq_id, None)
        length = self._lengths.pop(seq_id, 0)
        prefilled = self._prefilled.pop(seq_id, 0)
        if wire_seq is None or self._closed:
            return
        try:
            wait = self._settings.control_timeout_s
            reply = self._call(self.link.request(wire.STAGE_CLOSE, {"seq": wire_seq}, wait), wait)
        except (StageLost, ValueError) as exc:
            logger.info("closing sequence %d on %s: %s", seq_id, self.peer[:12], exc)
            return
        receipt = reply.get("receipt") if isinstance(reply, dict) else None
        if receipt is not None and self._on_receipt is not None:
            seen = StageSeen(self.peer, wire_seq, frozenset(m for m in (self.model, self._cid) if m),
                             prefilled, length - prefilled)
            self._on_receipt(seen, receipt)

    def sequence_length(self, seq_id: int) -> int:
        try:
            return self._lengths[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id}") from None

    def _wire_ids(self, seq_ids: list[int]) -> list[int]:
        try:
            return [self._wire[s] for s in seq_ids]
        except KeyError as exc:
            raise ValueError(f"unknown sequence {exc.args[0]}; call add_sequence first") from None

    def _exchange(self, op: str, seq_ids: list[int], inputs: np.ndarray, top_k: int, argmax: bool = False
                  ) -> tuple[wire.TensorMessage, int]:
        """One call: send the frame, check the reply; returns it and the number of rows it must hold.
        `argmax`: a greedy decode step, which the native step lane may carry (`_native_call`)."""
        if self._closed:
            raise ValueError("stage is closed")
        wire_ids = self._wire_ids(seq_ids)
        arr = np.ascontiguousarray(inputs, dtype=np.int32 if self.span.is_first() else np.float32)
        self._step += 1
        call = self._step % 2**32  # the frame's id on a direct link (a channel request gets the peer's own)
        frame: BinaryFrame | NativeCall | None = None
        if argmax and self._direct is not None:
            frame = self._native_call(op, call, wire_ids, arr, self)
        if frame is None:
            frame = wire.encode_input(call, op, self._step, wire_ids, arr, top_k, fp16=self._fp16)
        timeout = self._timeout + self._per_token * arr.shape[0]
        started = self._call_started = time.perf_counter()
        if self._direct is not None:
            try:
                reply = self._direct.call(frame, timeout, self._link_alive, self._settings.link_alive_poll_s,
                                          sent=idle.waiting)
            except LinkError as exc:  # whether the stage ran the call is unknown: its KV state is lost
                raise StageLost(self.peer, f"direct tensor link: {exc}") from None
            if op == "decode":
                self._clock.observe(time.perf_counter() - started)
        else:
            assert type(frame) is BinaryFrame
            pending = self.link.request_binary(TENSOR, {}, frame.payload, timeout)
            # decode steps are watched (a silent peer is pinged); an open or a prefill may find the peer
            # still loading, which can hold its loop: there only the mesh's heartbeats count
            watched = self._watched(pending) if op == "decode" else pending
            reply = self._call(watched, timeout, sent=idle.waiting)
        self.timing.calls += 1
        self.timing.seconds += time.perf_counter() - started
        message = self._reply(reply, call=call)
        self.timing.compute_s += message.compute_s
        for s in seq_ids:
            self._lengths[s] += arr.shape[0] if op == "prefill" else 1
            if op == "prefill":
                self._prefilled[s] += arr.shape[0]
        rows = 1 if op == "prefill" and self.span.is_last(self.config.num_layers) else arr.shape[0]
        return message, rows

    def _native_call(self, op: str, call: int, wire_ids: list[int], arr: np.ndarray, answering: RemoteStage
                     ) -> NativeCall | None:
        """A greedy decode step (top-k 1, whose answer is the argmax) as a `NativeCall` when the native step
        lane can carry it: one sequence over direct links, answered by `answering` (this stage, or a chain's
        last), values not sent as float16 — else None (the frame is encoded as ever)."""
        lane = native.loaded()
        if (lane is None or len(wire_ids) != 1 or self._fp16 or not self._settings.native_lane
                or self._step > wire.MAX_STEP or not answering.span.is_last(answering.config.num_layers)):
            return None
        vocab = answering.config.vocab_size
        key = (op, wire_ids[0], arr.dtype.char, arr.shape, vocab)
        heads = self._lane_heads.get(key)
        if heads is None:
            if len(self._lane_heads) >= MAX_LANE_HEADS:
                self._lane_heads.clear()
            heads = self._lane_heads[key] = (wire.input_head(op, 0, wire_ids, arr, 1),
                                             wire.logits_head(0, 1, vocab, 1))
        return NativeCall(lane, call, heads[0], self._step, arr, heads[1], vocab)

    def _reply(self, reply: Answer, next_peer: str | None = None, call: int = 0) -> wire.TensorMessage:
        """This stage's answer, decoded; a refusal raises ValueError (the call was bad) or `StageLost` (the
        stage failed — or, `next_lost` of a chain, the stage after it: `next_peer`). An answer the native
        step lane read (`split.tensor_link.Answer`) is a greedy step's argmax."""
        if type(reply) is int:
            return wire.argmax_message(call, reply >> 32, reply & 0xFFFF_FFFF)
        assert type(reply) is BinaryFrame
        try:
            message = wire.decode_output(reply, self.config.vocab_size)
        except (wire.FrameError, MeshError) as exc:
            raise StageLost(self.peer, f"sent a bad reply: {exc}") from None
        if message.error is not None:
            code, text = message.error
            if code in (wire.BAD_TENSOR, wire.BAD_REQUEST):
                raise ValueError(f"stage on {self.peer[:16]} refused the call: {text}")
            if code == wire.NEXT_LOST and next_peer is not None:
                raise StageLost(next_peer, f"{self.peer[:16]} says: {text}", code)
            raise StageLost(self.peer, f"{code}: {text}", code)
        return message

    def _forward(self, op: str, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        message, rows = self._exchange(op, seq_ids, inputs, self._top_k)
        return self._output(message, op, rows)

    def _output(self, message: wire.TensorMessage, op: str, rows: int) -> np.ndarray:
        """The array a reply carries (full logits rows rebuilt from top-k), checked to have `rows` rows."""
        out = message.array
        if out is None:  # top-k logits
            if message.top_ids is None or message.top_values is None:
                raise StageLost(self.peer, "sent a reply without values")
            out = wire.expand_top_k(message.top_ids, message.top_values, self.config.vocab_size)
        if out.shape[0] != rows:
            raise StageLost(self.peer, f"returned {out.shape[0]} rows, expected {rows}")
        if op == "prefill" and self.span.is_last(self.config.num_layers):
            return out[0]
        return out

    @property
    def transport(self) -> str:
        """How calls travel: "direct" (a tensor link) or "channel" (the peer's `tensors` data channel)."""
        return "direct" if self._direct is not None else "channel"

    async def _watched(self, reply: Coroutine[Any, Any, Any]) -> Any:
        """`reply`, unless the peer falls silent and does not answer a ping (`PeerSilent`)."""
        return await await_reply(reply, self.link, self._clock, self._watch.probe_timeout_s)

    def _link_alive(self) -> bool:
        """Polled by a direct link's call while it waits: the mesh link is up and, once the call has taken
        much longer than this stage's usual call, the peer answers a ping (at most one ping per wait)."""
        if not self.link.is_open:
            return False
        now = time.perf_counter()
        suspect = self._clock.suspect_after()
        if suspect is None or now - self._call_started < suspect or self._probed_at >= self._call_started:
            return True
        self._probed_at = now
        wait, gap = self._watch.probe_timeout_s, self._clock.typical()
        probe = asyncio.run_coroutine_threadsafe(heard_from(self.link, wait, gap), self._loop)
        try:
            return bool(probe.result(max_probe_s(wait, self.link.rtt_s, gap) + BRIDGE_GRACE_S))
        except TimeoutError:
            probe.cancel()
            return False

    def prefill(self, seq_id: int, inputs: np.ndarray) -> np.ndarray:
        return self._forward("prefill", [seq_id], inputs)

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        return self._forward("decode", list(seq_ids), inputs)

    def decode_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int]:
        """`decode` + each row's argmax, taken by the stage (see `models.stage`): only the ids come back."""
        if not self.span.is_last(self.config.num_layers):
            raise ValueError("only the last stage has logits")
        message, rows = self._exchange("decode", list(seq_ids), inputs, top_k=1, argmax=True)
        return self._argmax(message, rows)

    def _argmax(self, message: wire.TensorMessage, rows: int) -> list[int]:
        if message.top_ids is None or message.top_ids.shape != (rows, 1):
            raise StageLost(self.peer, f"returned no argmax for {rows} rows")
        return message.top_ids[:, 0].tolist()

    def passes_to(self, after: object, seq_ids: list[int]) -> bool:
        """Whether a decode step of `seq_ids` can go from this stage straight on to `after` (a chain)."""
        return (after is self.next_stage and self._direct is not None and after._direct is not None
                and all(s in self._chained for s in seq_ids))

    def decode_through(self, after: list[RemoteStage], seq_ids: list[int], inputs: np.ndarray,
                       argmax: bool) -> Any:
        """A decode step through a chain (`passes_to`): sent to this stage's peer, passed from stage to stage,
        answered by the last of `after`; returns the last stage's output (`decode`, or `decode_argmax`'s ids
        with `argmax`). A failure is a `StageLost` naming the stage whose link failed or that refused."""
        chain = [self, *after]
        last = chain[-1]
        if self._closed or any(s._direct is None for s in chain):
            raise ValueError("the chain is not linked")
        arr = np.ascontiguousarray(inputs, dtype=np.int32 if self.span.is_first() else np.float32)
        self._step += 1
        top_k = 1 if argmax else last._top_k
        call, wire_ids = self._step % 2**32, self._wire_ids(seq_ids)
        frame = self._native_call("chain", call, wire_ids, arr, last) if argmax else None
        if frame is None:
            frame = wire.encode_input(call, "chain", self._step, wire_ids, arr, top_k, fp16=self._fp16)
        started = time.perf_counter()
        for stage in chain:
            stage._call_started = started

        def dead() -> int | None:
            return next((i for i, stage in enumerate(chain) if not stage._link_alive()), None)

        links = [s._direct for s in chain if s._direct is not None]
        timeout = self._timeout + self._per_token * arr.shape[0]
        try:
            index, reply = call_chain(links, frame, timeout, dead, self._settings.link_alive_poll_s,
                                      sent=idle.waiting)
        except ChainLinkError as exc:  # whether the stages ran the step is unknown: their KV state is lost
            raise StageLost(chain[exc.index].peer, f"direct tensor link: {exc}") from None
        elapsed = time.perf_counter() - started
        for stage in chain:
            stage._clock.observe(elapsed)
        message = chain[index]._reply(reply, chain[index + 1].peer if index < len(chain) - 1 else None, call)
        if index != len(chain) - 1:
            raise StageLost(chain[index].peer, "answered a step it was to pass on")
        last.timing.calls += 1
        last.timing.chained += 1
        last.timing.seconds += elapsed
        last.timing.compute_s += message.compute_s
        for stage in chain:
            for s in seq_ids:
                stage._lengths[s] += 1
        if argmax:
            return last._argmax(message, arr.shape[0])
        return last._output(message, "decode", arr.shape[0])

    def close(self) -> None:
        if self._closed:
            return
        for seq_id in list(self._wire):
            self.remove_sequence(seq_id)
        self._closed = True
        self._close_direct()

    def relink(self) -> None:
        """Drop the direct link and open a new one at the next `add_sequence`: after a chain's failed step an
        answer may still be on its way in the old one (a stage that could not pass the step on says so)."""
        self._close_direct()
        self._want_direct = self._direct_wanted

    def _close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def abandon(self) -> None:
        """Forget every sequence without telling the peer (it is gone)."""
        self._closed = True
        self._wire.clear()
        self._lengths.clear()
        self._close_direct()

    def __repr__(self) -> str:
        return f"RemoteStage({self.peer[:12]}, {self.model}, layers {self.span})"
