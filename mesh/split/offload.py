"""Whole-request offload: a peer runs the request on its own engine and streams the tokens back on `control`.

Origin side (`OffloadClient.stream`): picks a request id `rid`, registers a queue for it, sends
`offload.open` {rid, model, prompt_ids, params} and yields `OffloadEvent`s as `offload.token` frames arrive,
until `offload.done` (or `offload.error`, raised as `RemoteError`). A link that closes mid-request raises
`StageLost` (the router then re-plans and resumes from the tokens already streamed). Closing the iterator
early sends `offload.cancel`.

Serving side (`OffloadServer`): checks the policy gate, validates the body (model known, ids in the
vocabulary, prompt + max_tokens within the context, sampling parameters valid), acknowledges, and runs the
stream in a task it owns; a cancel, the link closing or `stop()` ends that task and frees the sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shoal.mesh.p2p.errors import MeshError, RemoteError
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.protocol import ControlFrame
from shoal.mesh.split import wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.ports import MeshHandle
from shoal.mesh.split.remote_stage import StageLost
from shoal.models.admission import AdmissionError
from shoal.models.errors import ContextOverflowError
from shoal.models.generate import TokenEvent
from shoal.models.sampling import SamplingParams
from shoal.models.served import ServedModel

logger = logging.getLogger(__name__)

MAX_PROMPT_IDS = 16_384
_rids = itertools.count(int.from_bytes(os.urandom(3), "little") << 4)


@dataclass(frozen=True)
class OffloadEvent:
    """One streamed token, shaped like `models.generate.TokenEvent` where the API reads it."""

    token_id: int
    text: str
    index: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


class OffloadClient:
    """The origin's half. Needs the mesh service (`peer()`, `on_control()`, `add_peer_listener()`)."""

    def __init__(self, mesh: MeshHandle, *, open_timeout_s: float = SplitConfig.offload_open_timeout_s,
                 token_timeout_s: float = SplitConfig.offload_token_timeout_s) -> None:
        self._mesh = mesh
        self._open_timeout = open_timeout_s
        self._token_timeout = token_timeout_s
        self._queues: dict[tuple[str, int], asyncio.Queue[ControlFrame | BaseException]] = {}
        for frame_type in (wire.OFFLOAD_TOKEN, wire.OFFLOAD_DONE, wire.OFFLOAD_ERROR):
            mesh.on_control(frame_type, self._on_frame)
        mesh.add_peer_listener(self._on_peer)

    async def _on_frame(self, peer: Peer, frame: ControlFrame) -> None:
        rid = frame.body.get("rid")
        queue = self._queues.get((peer.peer_id, rid)) if type(rid) is int else None
        if queue is not None:
            queue.put_nowait(frame)
        return None

    def _on_peer(self, event: str, peer: Peer) -> None:
        if event != "left":
            return
        for (peer_id, _), queue in list(self._queues.items()):
            if peer_id == peer.peer_id:
                queue.put_nowait(StageLost(peer_id, f"link closed: {peer.close_reason or 'gone'}"))

    async def stream(self, peer_id: str, model: str, prompt_ids: list[int], params: dict[str, Any]
                     ) -> AsyncIterator[OffloadEvent]:
        rid = next(_rids) % 2**32
        key = (peer_id, rid)
        queue: asyncio.Queue[ControlFrame | BaseException] = asyncio.Queue()
        self._queues[key] = queue
        finished = False
        try:
            try:
                peer = self._mesh.peer(peer_id)
                body = {"rid": rid, "model": model, "prompt_ids": list(prompt_ids), "params": params}
                await peer.request(wire.OFFLOAD_OPEN, body, self._open_timeout)
            except RemoteError:
                raise
            except MeshError as exc:
                raise StageLost(peer_id, str(exc)) from None
            index = 0
            while True:
                try:
                    async with asyncio.timeout(self._token_timeout):
                        item = await queue.get()
                except TimeoutError:
                    raise StageLost(peer_id, f"no token for {self._token_timeout:.0f} s") from None
                if isinstance(item, BaseException):
                    raise item
                body = item.body
                if item.type == wire.OFFLOAD_ERROR:
                    finished = True
                    raise RemoteError(str(body.get("code", "error"))[:64], str(body.get("message", ""))[:500])
                if item.type == wire.OFFLOAD_DONE:
                    finished = True
                    return
                event = _token_event(body, index)
                if event is None:
                    raise StageLost(peer_id, "sent a malformed token frame")
                index += 1
                if event.finish_reason is not None:
                    finished = True
                yield event
                if finished:
                    return
        finally:
            self._queues.pop(key, None)
            if not finished:
                with contextlib.suppress(MeshError):
                    await self._mesh.peer(peer_id).notify(wire.OFFLOAD_CANCEL, {"rid": rid})


def _token_event(body: dict[str, Any], index: int) -> OffloadEvent | None:
    token, text, i = body.get("token"), body.get("text"), body.get("index")
    prompt, completion, finish = body.get("prompt_tokens"), body.get("completion_tokens"), body.get("finish")
    if type(token) is not int or not isinstance(text, str) or i != index:
        return None
    if type(prompt) is not int or type(completion) is not int:
        return None
    if finish is not None and not isinstance(finish, str):
        return None
    return OffloadEvent(token, text, index, prompt, completion, finish)


Acquire = Callable[[str], Awaitable[ServedModel]]
"""Returns the served model (`.engine`, `.tokenizer`, `.context_length`) or raises LookupError."""


class OffloadServer:
    """The serving half: runs whole requests for peers on this node's engines."""

    def __init__(self, mesh: MeshHandle, acquire: Acquire, gate: Callable[[], str | None],
                 *, max_requests: int = SplitConfig.max_offloads) -> None:
        self._mesh = mesh
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
        mesh.add_peer_listener(self._on_peer)

    async def _on_open(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        if self._stopped:
            raise RemoteError(wire.REFUSED, "the node is shutting down")
        reason = self._gate()
        if reason is not None:
            raise RemoteError(wire.REFUSED, reason)
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
        try:
            served = await self._acquire(model)
        except LookupError as exc:
            raise RemoteError(wire.NO_MODEL, str(exc)) from None
        try:  # the engine checks the ids and the context (the one place that does) before any work
            stream = served.engine.stream(ids, sampling)
        except AdmissionError as exc:
            raise RemoteError(wire.BUSY, str(exc)) from None
        except (ContextOverflowError, ValueError) as exc:
            raise RemoteError(wire.BAD_REQUEST, str(exc)) from None
        key = (peer.peer_id, rid)
        task = self._mesh.spawn(self._run(peer, rid, stream), name=f"offload {rid}")
        self._tasks[key] = task
        task.add_done_callback(lambda _t: self._tasks.pop(key, None))
        logger.info("offload %d from %s: %s, %d prompt tokens", rid, peer.peer_id[:12], model, len(ids))
        return {"accepted": True}

    async def _run(self, peer: Peer, rid: int, stream: AsyncIterator[TokenEvent]) -> None:
        index = 0
        try:
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    body = {
                        "rid": rid,
                        "index": index,
                        "token": int(event.token_id),
                        "text": event.text,
                        "prompt_tokens": event.prompt_tokens,
                        "completion_tokens": event.completion_tokens,
                        "finish": event.finish_reason,
                    }
                    await peer.notify(wire.OFFLOAD_TOKEN, body)
                    index += 1
            await peer.notify(wire.OFFLOAD_DONE, {"rid": rid})
            self.served += 1
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
        try:
            return await self._acquire(model)
        except LookupError as exc:
            raise RemoteError(wire.NO_MODEL, str(exc)) from None

    async def _on_info(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        served = await self._served(frame.body)
        config = served.stages[0].config
        return {"config": config.to_dict(), "vocab_size": served.tokenizer.vocab_size,
                "context_length": served.context_length}

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


def params_to_wire(params: Any, max_tokens: int | None = None) -> dict[str, Any]:
    """`SamplingParams` as the `params` object of `offload.open` (optionally with a new max_tokens)."""
    body = dataclasses.asdict(params)
    body["stop"] = list(body.get("stop") or ())
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body
