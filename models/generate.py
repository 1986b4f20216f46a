"""Generation over a chain of stages as async token streams, with continuous batching.

One background task owns the loop. Each turn it admits waiting requests in FIFO order (up to `max_batch`
live sequences), runs one prefill chunk (at most `prefill_chunk` tokens) of the oldest request still in
prefill, then one batched decode step for every sequence in decode. All stage work and sampling run in an
executor thread, never on the event loop. Stage i's output feeds stage i + 1.

    engine = Engine([stage], tokenizer)
    await engine.start()
    async for event in engine.stream(prompt_ids, SamplingParams(max_tokens=64, temperature=0)):
        print(event.text, end="")
    await engine.stop()
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from shoal.models.errors import ContextOverflowError, ModelError
from shoal.models.sampling import Sampler, SamplingParams, split_at_stop
from shoal.models.stage import Stage
from shoal.models.tokenizer import StreamDecoder, Tokenizer

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
DEFAULT_PREFILL_CHUNK = 256


class EngineStoppedError(ModelError):
    """The engine was stopped (or never started) while a request needed it."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. The last event of a stream has `finish_reason` set."""

    token_id: int
    text: str
    """New text this token completes ("" while a character or a possible stop string is incomplete)."""
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far, this one included (an EOS token counts)."""


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class EngineStats:
    """Counters since start, for metrics and tests."""

    prefill_chunks: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    """Sum of the batch sizes of all decode steps."""
    max_decode_batch: int = 0
    finished: int = 0


@dataclass(eq=False)
class _Request:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    sampler: Sampler
    decoder: StreamDecoder
    queue: asyncio.Queue[TokenEvent | BaseException] = field(default_factory=asyncio.Queue)
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    pending: str = ""
    """Decoded text held back because it may be the start of a stop string."""
    in_stages: bool = False
    done: bool = False
    cancelled: bool = False


class Engine:
    """Serves token streams from a chain of stages whose spans tile the model's layers."""

    def __init__(self, stages: Sequence[Stage], tokenizer: Tokenizer, *, max_batch: int = 8,
                 executor: Executor | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_context: int | None = None) -> None:
        if not stages:
            raise ValueError("an engine needs at least one stage")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        expected = 0
        for st in stages:
            if st.span.start != expected:
                raise ValueError(f"stage spans must tile the layers in order; got {st.span} after {expected}")
            expected = st.span.stop
        config = stages[0].config
        if expected != config.num_layers:
            raise ValueError(f"stage spans end at layer {expected}, the model has {config.num_layers}")
        self.stages = list(stages)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        limits = [config.context_length, *(getattr(st, "max_context", None) or config.context_length
                                           for st in stages)]
        self.max_context = min(limits if max_context is None else [*limits, max_context])
        self._executor = executor
        self._owns_executor = executor is None
        self._stage_lock = threading.Lock()
        self._seq_ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._prefilling: deque[_Request] = deque()
        self._decoding: list[_Request] = []
        self._retired: list[int] = []
        """Sequence ids whose KV caches are still to be freed in the stages."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self.stats = EngineStats()

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-engine")
        self._wake = asyncio.Event()
        self._running = True
        self._task = asyncio.create_task(self._run(), name="shoal-engine-loop")

    async def stop(self) -> None:
        """Refuse new requests, end live ones with EngineStoppedError, free their KV caches. Idempotent."""
        if not self._running and self._task is None:
            return
        self._running = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # the task's own CancelledError stays inside it
        for req in [*self._waiting, *self._prefilling, *self._decoding]:
            if not req.done:
                req.queue.put_nowait(EngineStoppedError("the engine stopped before the request finished"))
            self._retire(req)
        await self._free_retired()
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- metrics ------------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot."""
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        """Requests holding a batch slot (in prefill or decode)."""
        return len(self._prefilling) + len(self._decoding)

    @property
    def running(self) -> bool:
        return self._running

    # --- requests -----------------------------------------------------------------------------------------

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Queue a request and return its token stream. Raises here, before any work, on a bad prompt, a
        prompt + max_tokens past the context (ContextOverflowError) or a stopped engine. Closing the
        iterator early cancels the request and frees its KV cache in every stage."""
        if not self._running:
            raise EngineStoppedError("the engine is not running; call start() first")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        vocab = self.tokenizer.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        room = self.max_context - len(prompt)
        if room < 1:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens; the context holds {self.max_context}"
            )
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ContextOverflowError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                f"{self.max_context} tokens; lower max_tokens to at most {room}"
            )
        req = _Request(seq_id=next(self._seq_ids), prompt=prompt, params=params, max_tokens=max_tokens,
                       sampler=Sampler(params, prompt), decoder=self.tokenizer.stream_decoder())
        self._waiting.append(req)
        self._wake.set()
        return self._events(req)

    async def _events(self, req: _Request) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not req.done:
                req.cancelled = True
                self._wake.set()

    async def generate_text(self, prompt_ids: Sequence[int], params: SamplingParams) -> Generation:
        parts: list[str] = []
        ids: list[int] = []
        last: TokenEvent | None = None
        async for event in self.stream(prompt_ids, params):
            parts.append(event.text)
            ids.append(event.token_id)
            last = event
        assert last is not None and last.finish_reason is not None
        return Generation(text="".join(parts), token_ids=ids, finish_reason=last.finish_reason,
                          prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens)

    # --- the loop -----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._reap_cancelled()
            while self._waiting and self.active_count < self.max_batch:
                self._prefilling.append(self._waiting.popleft())
            if not self._prefilling and not self._decoding:
                self._wake.clear()
                if not self._waiting and not self._has_cancelled():
                    await self._wake.wait()
                continue
            if self._prefilling:
                await self._guarded(self._prefill_step, [self._prefilling[0]])
            if self._decoding:
                await self._guarded(self._decode_step, list(self._decoding))

    async def _guarded(self, step: Any, batch: list[_Request]) -> None:
        """Run a step; a failure ends the requests of that batch with the error (the engine keeps going)."""
        try:
            await step(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("generation step failed for sequences %s", [r.seq_id for r in batch])
            for req in batch:
                if not req.done:
                    req.queue.put_nowait(exc)
                self._retire(req)
            await self._free_retired()

    def _retire(self, req: _Request) -> None:
        """Take `req` off every list; its KV cache is freed by the next `_free_retired`."""
        req.done = True
        for queue in (self._waiting, self._prefilling, self._decoding):
            if req in queue:
                queue.remove(req)
        if req.in_stages:
            req.in_stages = False
            self._retired.append(req.seq_id)

    def _has_cancelled(self) -> bool:
        return bool(self._retired) or any(
            r.cancelled for r in itertools.chain(self._waiting, self._prefilling, self._decoding)
        )

    async def _reap_cancelled(self) -> None:
        live = itertools.chain(self._waiting, self._prefilling, self._decoding)
        for req in [r for r in live if r.cancelled]:
            self._retire(req)
        await self._free_retired()

    async def _in_executor(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _free_retired(self) -> None:
        if not self._retired:
            return
        seq_ids = list(self._retired)
        try:
            await self._in_executor(self._remove_sequences, seq_ids)
        except asyncio.CancelledError:
            raise  # the ids stay listed: stop() frees them (removal is idempotent)
        except Exception:
            logger.exception("freeing sequences %s failed", seq_ids)
        self._retired = [s for s in self._retired if s not in seq_ids]

    def _remove_sequences(self, seq_ids: list[int]) -> None:
        with self._stage_lock:
            for st in self.stages:
                for seq_id in seq_ids:
                    st.remove_sequence(seq_id)

    async def _prefill_step(self, batch: list[_Request]) -> None:
        req = batch[0]
        chunk = req.prompt[req.prefilled:req.prefilled + self.prefill_chunk]
        is_last = req.prefilled + len(chunk) >= len(req.prompt)
        if not req.in_stages:
            req.in_stages = True  # set before the call: a failure half-way still frees what was added
        token = await self._in_executor(self._run_prefill, req, chunk, is_last)
        req.prefilled += len(chunk)
        self.stats.prefill_chunks += 1
        self.stats.prefill_tokens += len(chunk)
        if is_last and not req.cancelled:
            self._prefilling.remove(req)
            self._decoding.append(req)
            self._accept(req, token)

    def _run_prefill(self, req: _Request, chunk: list[int], is_last: bool) -> int | None:
        with self._stage_lock:
            if req.prefilled == 0:
                for st in self.stages:
                    st.add_sequence(req.seq_id)
            x: np.ndarray = np.asarray(chunk, dtype=np.int32)
            for st in self.stages:
                x = st.prefill(req.seq_id, x)
        return req.sampler.next_token(x) if is_last else None

    async def _decode_step(self, batch: list[_Request]) -> None:
        batch = [r for r in batch if not r.cancelled]
        if not batch:
            return
        tokens = await self._in_executor(self._run_decode, batch)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(batch)
        self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(batch))
        for req, token in zip(batch, tokens, strict=True):
            if not req.cancelled and not req.done:
                self._accept(req, token)

    def _run_decode(self, batch: list[_Request]) -> list[int]:
        seq_ids = [r.seq_id for r in batch]
        *body, last = self.stages
        by_argmax = getattr(last, "decode_argmax", None)
        with self._stage_lock:
            x: np.ndarray = np.asarray([r.output[-1] for r in batch], dtype=np.int32)
            for st in body:
                x = st.decode(seq_ids, x)
            if by_argmax is not None and all(r.params.plain_greedy for r in batch):
                tokens = by_argmax(seq_ids, x)  # the logits stay where they were computed
            else:
                x = last.decode(seq_ids, x)
                tokens = None
        if tokens is None:
            return [r.sampler.next_token(row) for r, row in zip(batch, x, strict=True)]
        for req, token in zip(batch, tokens, strict=True):
            req.sampler.accept(token)
        return tokens

    # --- tokens -> events ---------------------------------------------------------------------------------

    def _accept(self, req: _Request, token: int) -> None:
        """Turn a sampled token into an event; finish the request on EOS, a stop string or max_tokens."""
        req.output.append(token)
        finish: FinishReason | None = None
        if token in self.tokenizer.stop_token_ids:
            text = req.pending + req.decoder.flush()
            req.pending = ""
            finish = "stop"
        else:
            text, req.pending, stopped = split_at_stop(req.pending + req.decoder.push(token), req.params.stop)
            finish = "stop" if stopped else None
            if finish is None and len(req.output) >= req.max_tokens:
                text += req.pending + req.decoder.flush()
                req.pending = ""
                finish = "length"
        event = TokenEvent(token_id=token, text=text, finish_reason=finish, prompt_tokens=len(req.prompt),
                           completion_tokens=len(req.output))
        req.queue.put_nowait(event)
        if finish is not None:
            self.stats.finished += 1
            self._retire(req)  # its KV cache is freed at the top of the next turn
