"""Whole-request offload: a peer runs the request on its own engine and streams the tokens back on `control`.

Origin side (`OffloadClient.stream`): picks a request id `rid`, registers a queue for it, sends
`offload.open` {rid, model, prompt_ids, params, coalesce: true} and yields `OffloadEvent`s as `offload.token`
frames arrive, until `offload.done` (or `offload.error`, raised as `RemoteError`). A link that closes
mid-request raises `StageLost` (the router then re-plans and resumes from the tokens already streamed), and
so does a token frame that breaks the format. Closing the iterator early sends `offload.cancel`.

Serving side (`OffloadServer`): checks the policy gate, validates the body (model known, ids in the
vocabulary, prompt + max_tokens within the context, sampling parameters valid), acknowledges, and runs the
stream in a task it owns; a cancel, the link closing or `stop()` ends that task and frees the sequence.

One frame per token while the sender keeps up; when it fell behind (its event loop was busy, or descheduled
on a loaded machine) and more tokens are already produced, an origin that sent `coalesce` gets them in the
same frame: `offload.token` then carries `more`, a list of the following tokens' bodies (same fields, indexes
in order, at most `MAX_COALESCED` tokens a frame, no logprobs). Each frame costs both nodes' event loops the
same Python whatever it carries (DTLS, SCTP, its SACK), so a backlog is caught up at a frame's cost, and no
token ever waits for another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shoal.mesh.p2p.errors import MeshError, RemoteError
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.protocol import ControlFrame
from shoal.mesh.split import wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.liveness import PeerSilent, Report, Watch, await_reply, reporting
from shoal.mesh.split.offload_frames import OffloadEvent, TokenFrame, token_body, token_events
from shoal.mesh.split.ports import MeshHandle
from shoal.mesh.split.quota import PeerQuota
from shoal.mesh.split.receipts import Expected, ReceiptError, Usage, UsageLedger
from shoal.mesh.split.remote_stage import StageLost
from shoal.models.admission import AdmissionError
from shoal.models.errors import ContextOverflowError, InsufficientMemoryError, ModelMemoryBudgetError
from shoal.models.generate import TokenEvent
from shoal.models.grammar import GrammarError, check_constraint
from shoal.models.sampling import SamplingParams
from shoal.models.served import ServedModel

logger = logging.getLogger(__name__)

MAX_PROMPT_IDS = 16_384
_rids = itertools.count(int.from_bytes(os.urandom(3), "little") << 4)


class OffloadClient:
    """The origin's half. Needs the mesh service (`peer()`, `on_control()`, `add_peer_listener()`)."""

    def __init__(self, mesh: MeshHandle, *, open_timeout_s: float = SplitConfig.offload_open_timeout_s,
                 token_timeout_s: float = SplitConfig.offload_token_timeout_s,
                 ledger: UsageLedger | None = None, settings: SplitConfig | None = None) -> None:
        """`settings`: when a silent peer is pinged, and lost (`split.liveness`)."""
        self._mesh = mesh
        self._open_timeout = open_timeout_s
        self._token_timeout = token_timeout_s
        self._watch = Watch.from_config(settings or SplitConfig())
        self._ledger = ledger
        self._queues: dict[tuple[str, int], asyncio.Queue[ControlFrame | BaseException]] = {}
        self._seen: dict[tuple[str, int], _Seen] = {}
        """What this node saw of each offloaded request until its `offload.done` (the receipt is checked
        against it): kept past `stream()`, which returns at the finish token, before the done frame."""
        for frame_type in (wire.OFFLOAD_TOKEN, wire.OFFLOAD_DONE, wire.OFFLOAD_ERROR):
            mesh.on_control(frame_type, self._on_frame)
        mesh.add_peer_listener(self._on_peer)

    async def _on_frame(self, peer: Peer, frame: ControlFrame) -> None:
        rid = frame.body.get("rid")
        if type(rid) is not int:
            return None
        key = (peer.peer_id, rid)
        seen = self._seen.get(key)
        if seen is not None:
            if frame.type == wire.OFFLOAD_TOKEN:
                more = frame.body.get("more")
                seen.tokens_out += 1 + (len(more) if isinstance(more, list) else 0)
            else:
                del self._seen[key]
                receipt = frame.body.get("receipt")
                if frame.type == wire.OFFLOAD_DONE and receipt is not None and self._ledger is not None:
                    self._mesh.spawn(self._countersign(peer, rid, seen, receipt), name=f"receipt {rid}")
        queue = self._queues.get(key)
        if queue is not None:
            queue.put_nowait(frame)
        return None

    async def _countersign(self, peer: Peer, rid: int, seen: _Seen, receipt: Any) -> None:
        """Check the server's receipt against what this node saw, countersign and keep it, send it back."""
        if self._ledger is None:
            return
        usage = receipt.get("usage") if isinstance(receipt, dict) else None
        model = usage.get("model") if isinstance(usage, dict) else None
        expected = Expected(peer.peer_id, str(rid), "offload", model if model in seen.models else seen.model,
                            seen.tokens_in, seen.tokens_out)
        try:
            signed = await self._ledger.countersign(expected, receipt)
            await peer.request(wire.OFFLOAD_RECEIPT, {"receipt": signed.to_dict()})
        except (ReceiptError, MeshError) as exc:
            logger.warning("offload %d: receipt from %s not countersigned: %s", rid, peer.peer_id[:12], exc)

    def _on_peer(self, event: str, peer: Peer) -> None:
        if event != "left":
            return
        for key in [k for k in self._seen if k[0] == peer.peer_id]:
            del self._seen[key]
        for (peer_id, _), queue in list(self._queues.items()):
            if peer_id == peer.peer_id:
                queue.put_nowait(StageLost(peer_id, f"link closed: {peer.close_reason or 'gone'}"))

    async def stream(self, peer_id: str, model: str, prompt_ids: list[int], params: dict[str, Any],
                     cid: str | None = None, on_wait: Callable[[str, float], None] | None = None
                     ) -> AsyncIterator[OffloadEvent]:
        """`cid`: the model's CID where this node knows it (a receipt may name the model by either).
        `on_wait(what, seconds)`: told each second while the peer opens (`open`: it may load the model) or
        has sent no token yet (`first_token`)."""
        rid = next(_rids) % 2**32
        key = (peer_id, rid)
        queue: asyncio.Queue[ControlFrame | BaseException] = asyncio.Queue()
        self._queues[key] = queue
        self._seen[key] = _Seen(model, frozenset(m for m in (model, cid) if m), len(prompt_ids))
        while len(self._seen) > MAX_SEEN:
            self._seen.pop(next(iter(self._seen)))
        finished = False
        try:
            try:
                peer = self._mesh.peer(peer_id)
                body = {"rid": rid, "model": model, "prompt_ids": list(prompt_ids), "params": params,
                        "coalesce": True}
                opened: Report | None = (lambda s: on_wait("open", s)) if on_wait is not None else None
                await reporting(peer.request(wire.OFFLOAD_OPEN, body, self._open_timeout), opened)
            except RemoteError:
                raise
            except MeshError as exc:
                raise StageLost(peer_id, str(exc)) from None
            index = 0
            clock = self._watch.clock()
            while True:
                try:  # a killed peer is found by its silence and an unanswered ping, well before heartbeats
                    first: Report | None = (lambda s: on_wait("first_token", s)) \
                        if on_wait is not None and index == 0 else None
                    # a token already here needs no watch (no task and timer per token on this path)
                    item = queue.get_nowait() if not queue.empty() else await await_reply(
                        queue.get(), peer, clock, self._watch.probe_timeout_s, self._token_timeout, first)
                except TimeoutError:
                    raise StageLost(peer_id, f"no token for {self._token_timeout:.0f} s") from None
                except PeerSilent as exc:
                    raise StageLost(peer_id, str(exc)) from None
                if isinstance(item, BaseException):
                    raise item
                body = item.body
                if item.type == wire.OFFLOAD_ERROR:
                    finished = True
                    raise RemoteError(str(body.get("code", "error"))[:64], str(body.get("message", ""))[:500])
                if item.type == wire.OFFLOAD_DONE:
                    finished = True
                    return
                events = token_events(body, index, params.get("stop") or ())
                if events is None:
                    raise StageLost(peer_id, "sent a malformed token frame")
                index += len(events)
                for event in events:
                    if event.finish_reason is not None:
                        finished = True
                    yield event
                if finished:
                    return
        finally:
            self._queues.pop(key, None)
            if not finished:
                self._seen.pop(key, None)
                with contextlib.suppress(MeshError):
                    await self._mesh.peer(peer_id).notify(wire.OFFLOAD_CANCEL, {"rid": rid})


MAX_SEEN = 1024
"""Offloaded requests whose `offload.done` a client still waits for (oldest forgotten first)."""


@dataclass
class _Seen:
    """What the origin saw of one offloaded request."""

    model: str
    models: frozenset[str]
    """Names the receipt may give the model by: the requested name, its CID."""
    tokens_in: int
    tokens_out: int = 0


Acquire = Callable[[str], Awaitable[ServedModel]]
"""Returns the served model (`.engine`, `.tokenizer`, `.context_length`) or raises LookupError."""


class OffloadServer:
    """The serving half: runs whole requests for peers on this node's engines."""

    def __init__(self, mesh: MeshHandle, acquire: Acquire, gate: Callable[[], str | None],
                 *, max_requests: int = SplitConfig.max_offloads, ledger: UsageLedger | None = None,
                 model_id: Callable[[str], str] = lambda name: name, quota: PeerQuota | None = None) -> None:
        """`ledger`: issue a usage receipt at the end of each request (in `offload.done`); `model_id`: the
        name a receipt gives a model (its CID where known); `quota`: refuse a peer past its hourly share."""
        self._mesh = mesh
        self._quota = quota
        self._ledger = ledger
        self._model_id = model_id
        self._acquire = acquire
        self._gate = gate
        self._max = max_requests
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._stopped = False
        self.served = 0
        mesh.on_control(wire.OFFLOAD_OPEN, self._on_open)
        mesh.on_control(wire.OFFLOAD_CANCEL, self._on_cancel)
        mesh.on_control(wire.OFFLOAD_INFO, self._on_info)
        mesh.on_control(wire.OFFLOAD_TOKENIZE, self._on_tokenize)
        mesh.on_control(wire.OFFLOAD_RECEIPT, self._on_receipt)
        mesh.add_peer_listener(self._on_peer)

    async def _on_open(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        if self._stopped:
            raise RemoteError(wire.REFUSED, "the node is shutting down")
        reason = self._gate()
        if reason is not None:
            raise RemoteError(wire.REFUSED, reason)
        over = self._quota.refusal(peer.peer_id) if self._quota is not None else None
        if over is not None:
            raise RemoteError(wire.QUOTA, over)
        body = frame.body
        rid, model = body.get("rid"), body.get("model")
        ids, params = body.get("prompt_ids"), body.get("params")
        if type(rid) is not int or not 0 <= rid < 2**32 or (peer.peer_id, rid) in self._tasks:
            raise RemoteError(wire.BAD_REQUEST, "offload.open needs a fresh u32 rid")
        if not isinstance(model, str) or not model:
            raise RemoteError(wire.BAD_REQUEST, "offload.open needs a model")
        if not isinstance(ids, list) or not 0 < len(ids) <= MAX_PROMPT_IDS or \
                any(type(t) is not int for t in ids):
            raise RemoteError(wire.BAD_REQUEST, f"prompt_ids must be 1-{MAX_PROMPT_IDS} token ids")
        if not isinstance(params, dict):
            raise RemoteError(wire.BAD_REQUEST, "params must be an object")
        if len(self._tasks) >= self._max:
            raise RemoteError(wire.BUSY, f"serving {self._max} offloaded requests already")
        try:
            sampling = SamplingParams(**params)
        except (TypeError, ValueError) as exc:
            raise RemoteError(wire.BAD_REQUEST, f"bad sampling parameters: {exc}") from None
        served = await self._load(model)
        if sampling.constraint is not None:  # a grammar that does not compile is the asker's mistake
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, check_constraint, sampling.constraint,
                                           served.engine.tokenizer, served.config.vocab_size)
            except GrammarError as exc:
                raise RemoteError(wire.BAD_REQUEST, str(exc)[:500]) from None
        try:  # the engine checks the ids and the context (the one place that does) before any work
            stream = served.engine.stream(ids, sampling)
        except AdmissionError as exc:
            raise RemoteError(wire.BUSY, str(exc)) from None
        except (ContextOverflowError, ValueError) as exc:
            raise RemoteError(wire.BAD_REQUEST, str(exc)) from None
        key = (peer.peer_id, rid)
        layers = served.stages[0].config.num_layers if served.stages else 0
        usage = _Served(self._model_id(model), layers, len(ids), time.time(), sampling.stop,
                        body.get("coalesce") is True)
        task = self._mesh.spawn(self._run(peer, rid, stream, usage), name=f"offload {rid}")
        self._tasks[key] = task
        task.add_done_callback(lambda _t: self._tasks.pop(key, None))
        logger.info("offload %d from %s: %s, %d prompt tokens", rid, peer.peer_id[:12], model, len(ids))
        return {"accepted": True}

    async def _run(self, peer: Peer, rid: int, stream: AsyncIterator[TokenEvent],
                   served: _Served | None = None) -> None:
        index = 0
        ready = getattr(stream, "queued", None) if served is not None and served.coalesce else None
        frame = TokenFrame(rid)
        try:
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    frame.add(token_body(event, index, served.stops if served is not None else ()), event)
                    index += 1
                    if ready is not None and frame.has_room(event) and ready():
                        continue  # the next token is produced already: it joins this frame, no wait added
                    await peer.notify(wire.OFFLOAD_TOKEN, frame.take())
            if frame.frames < index:
                logger.info("offload %d: %d tokens in %d frames (the sender fell behind)", rid, index,
                            frame.frames)
            done: dict[str, Any] = {"rid": rid}
            if self._ledger is not None and served is not None:
                usage = Usage(self._mesh.identity.peer_id, peer.peer_id, str(rid), "offload", served.model,
                              (0, served.layers), served.tokens_in, index, served.started, time.time())
                done["receipt"] = self._ledger.issue(usage).to_dict()
            await peer.notify(wire.OFFLOAD_DONE, done)
            self.served += 1
            if self._quota is not None and served is not None:
                self._quota.record(peer.peer_id, served.tokens_in + index)
        except MeshError as exc:
            logger.info("offload %d: link to %s lost: %s", rid, peer.peer_id[:12], exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("offload %d failed", rid)
            with contextlib.suppress(MeshError):
                body = {"rid": rid, "code": wire.INTERNAL, "message": str(exc)[:500]}
                await peer.notify(wire.OFFLOAD_ERROR, body)

    async def _served(self, body: dict[str, Any]) -> ServedModel:
        reason = self._gate()
        if reason is not None:
            raise RemoteError(wire.REFUSED, reason)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RemoteError(wire.BAD_REQUEST, "a model name is needed")
        return await self._load(model)

    async def _load(self, model: str) -> ServedModel:
        """The served model, loading it on first use; a model this node lacks, or has no room for now (its
        memory budget, or free memory), is the asker's cue to re-plan elsewhere — never an internal error."""
        try:
            return await self._acquire(model)
        except LookupError as exc:
            raise RemoteError(wire.NO_MODEL, str(exc)) from None
        except (ModelMemoryBudgetError, InsufficientMemoryError) as exc:
            raise RemoteError(wire.BUSY, str(exc)[:500]) from None

    async def _on_info(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        served = await self._served(frame.body)
        config = served.stages[0].config
        return {"config": config.to_dict(), "vocab_size": served.tokenizer.vocab_size,
                "context_length": served.context_length, "sampling_defaults": dict(served.sampling_defaults)}

    async def _on_tokenize(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        from shoal.models.tokenizer import validate_messages

        served = await self._served(frame.body)
        messages, text = frame.body.get("messages"), frame.body.get("text")
        loop = asyncio.get_running_loop()
        try:
            if messages is not None:
                checked = validate_messages(messages)
                ids = await loop.run_in_executor(None, served.tokenizer.encode_chat, checked)
            elif isinstance(text, str):
                ids = await loop.run_in_executor(None, served.tokenizer.encode, text)
            else:
                raise RemoteError(wire.BAD_REQUEST, "offload.tokenize needs messages or text")
        except ValueError as exc:
            raise RemoteError(wire.BAD_REQUEST, str(exc)[:300]) from None
        return {"ids": [int(i) for i in ids]}

    async def _on_receipt(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        """The origin's countersigned copy of a receipt this node issued: kept if it is that receipt."""
        if self._ledger is None:
            raise RemoteError(wire.BAD_REQUEST, "this node keeps no receipts")
        try:
            await self._ledger.accept(peer.peer_id, frame.body.get("receipt"))
        except ReceiptError as exc:
            raise RemoteError(wire.BAD_REQUEST, str(exc)[:300]) from None
        return {}

    async def _on_cancel(self, peer: Peer, frame: ControlFrame) -> None:
        task = self._tasks.get((peer.peer_id, frame.body.get("rid")))  # type: ignore[arg-type]
        if task is not None:
            task.cancel()
        return None

    def _on_peer(self, event: str, peer: Peer) -> None:
        if event == "left":
            for (peer_id, _), task in list(self._tasks.items()):
                if peer_id == peer.peer_id:
                    task.cancel()

    async def stop(self) -> None:
        self._stopped = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class _Served:
    """What the server's receipt for one offloaded request says besides the token count."""

    model: str
    layers: int
    tokens_in: int
    started: float
    stops: tuple[str, ...] = ()
    """The request's stop strings (a token frame names the one that matched by its place here)."""
    coalesce: bool = False
    """The origin takes several tokens in one frame (`more`) when the sender fell behind."""


def params_to_wire(params: Any, max_tokens: int | None = None) -> dict[str, Any]:
    """`SamplingParams` as the `params` object of `offload.open` (optionally with a new max_tokens)."""
    body = dataclasses.asdict(params)
    body["stop"] = list(body.get("stop") or ())
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body
