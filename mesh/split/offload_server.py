"""The serving half of whole-request offload (`split.offload` describes the protocol): `OffloadServer` checks
the policy gate, validates `offload.open` (model known, ids in the vocabulary, prompt + max_tokens within the
context, sampling parameters valid), acknowledges, and runs the stream in a task it owns — its frames on the
request's direct link when the origin made one (`split.offload_link`), else on the control channel; a
cancel, the link closing or `stop()` ends that task and frees the sequence. It also answers `offload.info`,
`offload.tokenize` and `offload.receipt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shoal.mesh.p2p.errors import MeshError, RemoteError
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.protocol import ControlFrame
from shoal.mesh.split import offload_link, wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.offload import MAX_PROMPT_IDS
from shoal.mesh.split.offload_frames import TokenFrame, token_body
from shoal.mesh.split.offload_link import TokenSender
from shoal.mesh.split.ports import MeshHandle
from shoal.mesh.split.quota import PeerQuota, check_allowed
from shoal.mesh.split.receipts import ReceiptError, Usage, UsageLedger
from shoal.mesh.split.tensor_link import LinkError
from shoal.mesh.split.tensor_link_server import TensorLinkServer
from shoal.models.admission import AdmissionError
from shoal.models.errors import ContextOverflowError, InsufficientMemoryError, ModelMemoryBudgetError
from shoal.models.generate import TokenEvent
from shoal.models.grammar import GrammarError, check_constraint
from shoal.models.sampling import SamplingParams
from shoal.models.served import ServedModel

logger = logging.getLogger(__name__)

Acquire = Callable[[str], Awaitable[ServedModel]]
"""Returns the served model (`.engine`, `.tokenizer`, `.context_length`) or raises LookupError."""


class OffloadServer:
    """The serving half: runs whole requests for peers on this node's engines."""

    def __init__(self, mesh: MeshHandle, acquire: Acquire, gate: Callable[[], str | None],
                 *, max_requests: int = SplitConfig.max_offloads, ledger: UsageLedger | None = None,
                 model_id: Callable[[str], str] = lambda name: name, quota: PeerQuota | None = None,
                 links: TensorLinkServer | None = None,
                 drain_timeout_s: float = SplitConfig.offload_token_timeout_s) -> None:
        """`ledger`: issue a usage receipt at the end of each request (in `offload.done`); `model_id`: the
        name a receipt gives a model (its CID where known); `quota`: refuse a peer past its hourly share;
        `links`: where the direct links an `offload.open` names are claimed (`split.offload_link`);
        `drain_timeout_s`: how long a token may wait for an origin that does not read its link."""
        self._links = links
        self._drain_timeout = drain_timeout_s
        self.tokens_over = {"direct": 0, "channel": 0}
        """Tokens sent, by how they went (`GET /v1/mesh/route`)."""
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
        check_allowed(peer.peer_id, self._gate, self._quota)
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
        sender = await self._claim(peer, body.get("link"), rid)
        task = self._mesh.spawn(self._run(peer, rid, stream, usage, sender), name=f"offload {rid}")
        self._tasks[key] = task
        task.add_done_callback(lambda _t: self._tasks.pop(key, None))
        if sender is not None:
            sender.on_lost = task.cancel  # the origin went away: stop computing for it
        logger.info("offload %d from %s: %s, %d prompt tokens%s", rid, peer.peer_id[:12], model, len(ids),
                    " (direct link)" if sender is not None else "")
        return {"accepted": True, "link": sender is not None}

    async def _claim(self, peer: Peer, lid: object, rid: int) -> TokenSender | None:
        """The direct link `offload.open` names (`lid`), running on this loop; None: the data channel."""
        link = self._links.claim(peer.peer_id, lid) if self._links is not None and lid is not None else None
        if link is None:
            return None
        try:
            return await offload_link.attach(link.sock, link.sealer, rid, self._drain_timeout)
        except LinkError as exc:
            logger.info("offload %d: its link from %s failed: %s", rid, peer.peer_id[:12], exc)
            return None

    async def _run(self, peer: Peer, rid: int, stream: AsyncIterator[TokenEvent],
                   served: _Served | None = None, sender: TokenSender | None = None) -> None:
        """Stream the tokens, then `offload.done`, on the request's direct link (`sender`) if it has one, else
        on the control channel — every frame of a request on the one transport, so a done never overtakes
        a token."""
        index = 0
        ready = getattr(stream, "queued", None) if served is not None and served.coalesce else None
        frame = TokenFrame(rid)
        send = sender.send if sender is not None else peer.notify
        over = "direct" if sender is not None else "channel"
        try:
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    frame.add(token_body(event, index, served.stops if served is not None else ()), event)
                    index += 1
                    if ready is not None and frame.has_room(event) and ready():
                        continue  # the next token is produced already: it joins this frame, no wait added
                    taken = frame.take()
                    await send(wire.OFFLOAD_TOKEN, taken)
                    self.tokens_over[over] += 1 + len(taken.get("more", ()))
            if frame.frames < index:
                logger.info("offload %d: %d tokens in %d frames (the sender fell behind)", rid, index,
                            frame.frames)
            done: dict[str, Any] = {"rid": rid}
            if self._ledger is not None and served is not None:
                usage = Usage(self._mesh.identity.peer_id, peer.peer_id, str(rid), "offload", served.model,
                              (0, served.layers), served.tokens_in, index, served.started, time.time())
                done["receipt"] = self._ledger.issue(usage).to_dict()
            await send(wire.OFFLOAD_DONE, done)
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
                await send(wire.OFFLOAD_ERROR, body)
        finally:
            if sender is not None:
                sender.close()  # what was written still goes out

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
