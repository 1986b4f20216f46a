"""Running one request across stages on peers, and surviving a stage that leaves.

- `StageLink`: what a stage needs from a link — `p2p.peer.Peer` satisfies it (the in-process tests' fake,
  `tests/mesh/stage_links.py`, hands calls straight to a `StageHost`). The local part of a split is no link:
  it is a `DirectStage` on this node's own host.
- `RemoteStage`: the `models.stage.Stage` protocol over a link. The `Engine` calls stages from an executor
  thread; each blocking method bridges to the node's event loop with
  `asyncio.run_coroutine_threadsafe(...).result(timeout)`, except tensor calls over a direct tensor link
  (`mesh.tensor_link`, opened at the first `add_sequence` when the peer's API address is reachable), which
  the calling thread makes on the socket itself. A link that closes, times out or answers with an error
  raises `StageLost` naming the peer.
- `SplitPipeline`: one `Stage` for the whole model made of a chain of stages. It remembers every token id fed
  to each sequence; when a stage is lost it asks its `rebuild` callback for a new chain (a re-plan without the
  lost peer), re-runs prefill over the remembered ids on the new chain, then retries the call that failed.
  The engine above sees one slow step — no token is lost or repeated, and its sampler state is untouched, so
  greedy output equals the run without the fault.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from shoal.mesh.p2p.errors import MeshError, PeerUnavailable, RemoteError, RequestTimeout
from shoal.mesh.p2p.protocol import TENSOR, BinaryFrame
from shoal.mesh.split import wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.tensor_link import TENSOR_LINK, LinkError, TensorLinkClient
from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage

logger = logging.getLogger(__name__)

LOCAL_PEER = "local"
BRIDGE_GRACE_S = 1.0
"""How much longer than a call's own timeout a thread waits on the loop for it (the call times out first)."""
_wire_seqs = itertools.count(int.from_bytes(os.urandom(3), "little") << 4)


def next_wire_seq() -> int:
    """A u32 sequence id for `stage.open`, unique within this process."""
    return next(_wire_seqs) % 2**32


class StageLost(PeerUnavailable):
    """A stage's peer went away (link closed, timed out, or failed the call); `peer` says which."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(f"stage on {peer[:16]} lost: {message}")
        self.peer = peer


class StageLink(Protocol):
    peer_id: str

    async def request(
        self, frame_type: str, body: dict[str, Any], timeout_s: float | None = None
    ) -> dict: ...

    async def request_binary(self, kind: int, meta: dict[str, Any], payload: bytes = b"",
                             timeout_s: float | None = None) -> BinaryFrame: ...


@dataclass
class LinkTiming:
    """Per-stage accounting (for the route trace and the bench)."""

    calls: int = 0
    seconds: float = 0.0
    """Wall time of the calls, as the origin saw them."""
    compute_s: float = 0.0
    """Compute time the stage reported for them: `seconds - compute_s` is what the link and relaying cost."""

    def to_dict(self) -> dict[str, float]:
        return {"calls": self.calls, "seconds": round(self.seconds, 4), "compute_s": round(self.compute_s, 4)}


class RemoteStage:
    """Layers `span` of `model`, run by the node behind `link`. Blocking methods; call them off the loop."""

    def __init__(self, link: StageLink, loop: asyncio.AbstractEventLoop, model: str, config: ModelConfig,
                 span: LayerSpan, *, settings: SplitConfig | None = None, top_k: int = wire.DEFAULT_TOP_K,
                 fp16: bool = False, cid: str | None = None, direct: bool = False) -> None:
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
        self._step = 0
        self._closed = False
        self._want_direct = direct
        self._direct: TensorLinkClient | None = None
        self.timing = LinkTiming()

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        if threading.get_ident() == getattr(self._loop, "_thread_id", None):
            coro.close()
            raise RuntimeError("RemoteStage methods block; call them from an executor thread")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout + BRIDGE_GRACE_S)
        except TimeoutError:
            future.cancel()
            raise StageLost(self.peer, f"no answer within {timeout:.0f} s") from None
        except (PeerUnavailable, RequestTimeout) as exc:
            raise StageLost(self.peer, str(exc)) from None
        except RemoteError as exc:
            if exc.code in (wire.BAD_TENSOR, wire.BAD_REQUEST):
                raise ValueError(f"stage on {self.peer[:16]} refused the call: {exc.message}") from None
            raise StageLost(self.peer, str(exc)) from None
        except MeshError as exc:
            raise StageLost(self.peer, str(exc)) from None

    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._wire:
            raise ValueError(f"sequence {seq_id} exists already")
        wire_seq = next_wire_seq()
        body: dict[str, Any] = {"model": self.model, "span": str(self.span), "seq": wire_seq}
        if self._cid:
            body["cid"] = self._cid  # lets a peer without the model fetch just this span
        # the first open of a span loads (or compiles) it on the peer: allow for that
        reply = self._call(self.link.request(wire.STAGE_OPEN, body, self._open_timeout), self._open_timeout)
        if reply.get("hidden") != self.config.hidden_size or reply.get("vocab") != self.config.vocab_size:
            raise StageLost(self.peer, f"serves a different model shape: {reply}")
        self._wire[seq_id] = wire_seq
        self._lengths[seq_id] = 0
        if self._want_direct:
            self._want_direct = False  # one try per stage
            self._direct = self._open_direct()

    def _open_direct(self) -> TensorLinkClient | None:
        """A direct tensor link to the peer when its API address is reachable (see `mesh.tensor_link`), or
        None: the calls then go over the data channel."""
        address = getattr(self.link, "advert", {}).get("api") or getattr(self.link, "api_address", None)
        if not isinstance(address, str) or ":" not in address:
            return None
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            wait = self._settings.control_timeout_s
            grant = self._call(self.link.request(TENSOR_LINK, {}, wait), wait)
            client = TensorLinkClient.connect(host, grant, self._settings.link_handshake_timeout_s,
                                              self._settings.link_record_timeout_s)
        except (StageLost, ValueError, LinkError) as exc:
            logger.info("no direct tensor link to %s (%s); using the data channel", self.peer[:12], exc)
            return None
        logger.info("direct tensor link to %s at %s", self.peer[:12], host)
        return client

    def remove_sequence(self, seq_id: int) -> None:
        wire_seq = self._wire.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        if wire_seq is None or self._closed:
            return
        try:
            wait = self._settings.control_timeout_s
            self._call(self.link.request(wire.STAGE_CLOSE, {"seq": wire_seq}, wait), wait)
        except (StageLost, ValueError) as exc:
            logger.info("closing sequence %d on %s: %s", seq_id, self.peer[:12], exc)

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

    def _exchange(self, op: str, seq_ids: list[int], inputs: np.ndarray, top_k: int
                  ) -> tuple[wire.TensorMessage, int]:
        """One call: send the frame, check the reply; returns it and the number of rows it must hold."""
        if self._closed:
            raise ValueError("stage is closed")
        wire_ids = self._wire_ids(seq_ids)
        arr = np.ascontiguousarray(inputs, dtype=np.int32 if self.span.is_first() else np.float32)
        self._step += 1
        call = self._step % 2**32  # the frame's id on a direct link (a channel request gets the peer's own)
        frame = wire.encode_input(call, op, self._step, wire_ids, arr, top_k, fp16=self._fp16)
        timeout = self._timeout + self._per_token * arr.shape[0]
        started = time.perf_counter()
        if self._direct is not None:
            try:
                reply = self._direct.call(frame, timeout, self._link_alive)
            except LinkError as exc:  # whether the stage ran the call is unknown: its KV state is lost
                raise StageLost(self.peer, f"direct tensor link: {exc}") from None
        else:
            reply = self._call(self.link.request_binary(TENSOR, {}, frame.payload, timeout), timeout)
        self.timing.calls += 1
        self.timing.seconds += time.perf_counter() - started
        try:
            message = wire.decode_output(reply, self.config.vocab_size)
        except (wire.FrameError, MeshError) as exc:
            raise StageLost(self.peer, f"sent a bad reply: {exc}") from None
        self.timing.compute_s += message.compute_s
        if message.error is not None:
            code, text = message.error
            if code in (wire.BAD_TENSOR, wire.BAD_REQUEST):
                raise ValueError(f"stage on {self.peer[:16]} refused the call: {text}")
            raise StageLost(self.peer, f"{code}: {text}")
        for s in seq_ids:
            self._lengths[s] += arr.shape[0] if op == "prefill" else 1
        rows = 1 if op == "prefill" and self.span.is_last(self.config.num_layers) else arr.shape[0]
        return message, rows

    def _forward(self, op: str, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        message, rows = self._exchange(op, seq_ids, inputs, self._top_k)
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

    def _link_alive(self) -> bool:
        return bool(getattr(self.link, "is_open", True))

    def prefill(self, seq_id: int, inputs: np.ndarray) -> np.ndarray:
        return self._forward("prefill", [seq_id], inputs)

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        return self._forward("decode", list(seq_ids), inputs)

    def decode_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int]:
        """`decode` + each row's argmax, taken by the stage (see `models.stage`): only the ids come back."""
        if not self.span.is_last(self.config.num_layers):
            raise ValueError("only the last stage has logits")
        message, rows = self._exchange("decode", list(seq_ids), inputs, top_k=1)
        if message.top_ids is None or message.top_ids.shape != (rows, 1):
            raise StageLost(self.peer, f"returned no argmax for {rows} rows")
        return message.top_ids[:, 0].tolist()

    def close(self) -> None:
        if self._closed:
            return
        for seq_id in list(self._wire):
            self.remove_sequence(seq_id)
        self._closed = True
        self._close_direct()

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


def _token_ids(inputs: np.ndarray) -> list[int]:
    """Token ids as Python ints (one `tolist`, not a NumPy scalar per id)."""
    return np.asarray(inputs, dtype=np.int64).reshape(-1).tolist()


Rebuild = Callable[[frozenset[str]], list[Stage]]
"""Blocking: a new chain of stages tiling the model, avoiding the given peers (a re-plan)."""


@dataclass
class Replan:
    lost: str
    reason: str
    at_tokens: int
    seconds: float
    stages: list[tuple[str, str]] = field(default_factory=list)


class SplitPipeline:
    """A whole-model `Stage` run by a chain of stages, rebuilt (at most `max_replans` times) on a loss."""

    def __init__(self, config: ModelConfig, stages: list[Stage], rebuild: Rebuild, *, max_replans: int = 3,
                 on_replan: Callable[[Replan], None] | None = None) -> None:
        self._check_chain(config, stages)
        self.config = config
        self.span = LayerSpan.whole(config.num_layers)
        self.stages = stages
        self._rebuild = rebuild
        self._max_replans = max_replans
        self._on_replan = on_replan
        self._history: dict[int, list[int]] = {}
        self._excluded: set[str] = set()
        self.replans: list[Replan] = []
        self._attempts = 0
        self._closed = False

    @staticmethod
    def _check_chain(config: ModelConfig, stages: list[Stage]) -> None:
        start = 0
        for stage in stages:
            if stage.span.start != start:
                raise ValueError(f"stages do not tile the model: {[str(s.span) for s in stages]}")
            start = stage.span.stop
        if start != config.num_layers:
            raise ValueError(f"stages end at layer {start}, the model has {config.num_layers}")

    def route(self) -> list[tuple[str, str]]:
        return [(getattr(s, "peer", LOCAL_PEER), str(s.span)) for s in self.stages]

    def timings(self) -> list[dict[str, Any]]:
        """Per-stage call accounting of the current chain (see `LinkTiming`)."""
        out = []
        for stage in self.stages:
            timing = getattr(stage, "timing", None)
            if isinstance(timing, LinkTiming):
                out.append({"peer": getattr(stage, "peer", LOCAL_PEER), "layers": str(stage.span),
                            "link": getattr(stage, "transport", "local"), **timing.to_dict()})
        return out

    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._history:
            raise ValueError(f"sequence {seq_id} exists already")
        self._retrying(lambda: [s.add_sequence(seq_id) for s in self.stages])
        self._history[seq_id] = []

    def remove_sequence(self, seq_id: int) -> None:
        if self._history.pop(seq_id, None) is None:
            return
        for stage in self.stages:
            try:
                stage.remove_sequence(seq_id)
            except StageLost as exc:
                logger.info("removing sequence %d: %s", seq_id, exc)

    def sequence_length(self, seq_id: int) -> int:
        try:
            return len(self._history[seq_id])
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id}") from None

    def _chain(self, op: str, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        x = inputs
        for stage in self.stages:
            x = stage.prefill(seq_ids[0], x) if op == "prefill" else stage.decode(seq_ids, x)
        return x

    def _chain_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int]:
        *body, last = self.stages
        x = inputs
        for stage in body:
            x = stage.decode(seq_ids, x)
        by_argmax = getattr(last, "decode_argmax", None)
        if by_argmax is not None:
            return by_argmax(seq_ids, x)
        return [int(i) for i in np.argmax(last.decode(seq_ids, x), axis=1)]

    def prefill(self, seq_id: int, inputs: np.ndarray) -> np.ndarray:
        ids = _token_ids(inputs)
        if seq_id not in self._history:
            raise ValueError(f"unknown sequence {seq_id}; call add_sequence first")
        out = self._retrying(lambda: self._chain("prefill", [seq_id], inputs))
        self._history[seq_id].extend(ids)
        return out

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        return self._decode(seq_ids, inputs, lambda: self._chain("decode", list(seq_ids), inputs))

    def decode_argmax(self, seq_ids: list[int], inputs: np.ndarray) -> list[int]:
        """`decode` + each row's argmax, taken by the last stage (a remote one sends back only the ids)."""
        return self._decode(seq_ids, inputs, lambda: self._chain_argmax(list(seq_ids), inputs))

    def _decode(self, seq_ids: list[int], inputs: np.ndarray, step: Callable[[], Any]) -> Any:
        ids = _token_ids(inputs)
        missing = [s for s in seq_ids if s not in self._history]
        if missing or len(ids) != len(seq_ids):
            raise ValueError(f"decode needs one id per known sequence (unknown: {missing})")
        out = self._retrying(step)
        for s, t in zip(seq_ids, ids, strict=True):
            self._history[s].append(t)
        return out

    def _retrying(self, call: Callable[[], Any]) -> Any:
        while True:
            try:
                return call()
            except StageLost as exc:
                lost = exc
            while True:  # recover; a stage of the new chain may be lost during the replay too
                self._attempts += 1
                if self._attempts > self._max_replans:
                    raise lost
                try:
                    self._recover(lost)
                    break
                except StageLost as exc:
                    lost = exc

    def _recover(self, lost: StageLost) -> None:
        started = time.perf_counter()
        logger.warning("split: %s; re-planning without it", lost)
        self._excluded.add(lost.peer)  # "local" too: this node failed to build its part
        old, self.stages = self.stages, []
        for stage in old:
            try:
                if getattr(stage, "peer", None) == lost.peer and hasattr(stage, "abandon"):
                    stage.abandon()  # its peer is gone: don't wait on it to say goodbye
                else:
                    stage.close()
            except (StageLost, ValueError, MeshError) as exc:
                logger.info("closing %r after a loss: %s", stage, exc)
        stages = self._rebuild(frozenset(self._excluded))
        self._check_chain(self.config, stages)
        self.stages = stages
        for seq_id, history in self._history.items():
            for stage in stages:
                stage.add_sequence(seq_id)
            if history:
                self._chain("prefill", [seq_id], np.asarray(history, dtype=np.int32))
        tokens = max((len(h) for h in self._history.values()), default=0)
        replan = Replan(lost.peer, str(lost), tokens, time.perf_counter() - started, self.route())
        self.replans.append(replan)
        logger.warning("split: resumed on %s after %.2f s (replayed %d tokens)", replan.stages,
                       replan.seconds, tokens)
        if self._on_replan is not None:
            self._on_replan(replan)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._history.clear()
        for stage in self.stages:
            try:
                stage.close()
            except (StageLost, ValueError, MeshError) as exc:
                logger.info("closing %r: %s", stage, exc)
