"""Generation over a chain of stages as async token streams, with continuous batching.

One background task owns the loop. Each turn it admits waiting requests in FIFO order (up to `max_batch`
live sequences, and only while the KV cache has room for every token they may use: models/admission.py),
runs one prefill chunk (at most `prefill_chunk` tokens) of the oldest request still in prefill, then
batched decode steps for every sequence in decode. All stage work and sampling run in an executor thread,
never on the event loop. Stage i's output feeds stage i + 1. A failing step ends only the requests it can be
pinned on: a failed batched decode is retried one sequence at a time for the sequences no stage had touched.

Decode steps run back to back on the executor thread for as long as the batch is unchanged and the loop has
nothing else to do (no request waiting, none in prefill, none cancelled, the engine running): the thread
also turns each token into its event (the request's text, stop strings, max_tokens), so it knows when a
request ends, and posts each step's events to the loop, which streams them. A step then costs no hand-off
to the loop and back (two thread wake-ups, 0.2–0.7 ms a token on the 2-core VM of docs/models.md).

    engine = Engine([stage], tokenizer)
    await engine.start()
    async for event in engine.stream(prompt_ids, SamplingParams(max_tokens=64, temperature=0)):
        print(event.text, end="")
    await engine.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from shoal.models import idle
from shoal.models.admission import Admission, AdmissionLimits, AdmissionTimeoutError
from shoal.models.chain import StageChain
from shoal.models.errors import ContextOverflowError, ModelError
from shoal.models.grammar import GrammarMatcher
from shoal.models.requests import (
    EngineStats,
    EventLogprobs,
    FinishReason,
    Generation,
    Request,
    TokenEvent,
    TokenLogprob,
    TokenStream,
    event_logprobs,
    next_event,
)
from shoal.models.sampling import Sampler, SamplingParams
from shoal.models.stage import Stage
from shoal.models.tokenizer import Tokenizer

__all__ = ["Engine", "EngineStats", "EngineStoppedError", "EventLogprobs", "FinishReason", "Generation",
           "TokenEvent", "TokenLogprob"]

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 256
DEFAULT_MAX_WAITING = 64
RATE_SMOOTHING = 0.2
"""Weight of the newest decode step in the token-rate average behind Retry-After hints."""


class EngineStoppedError(ModelError):
    """The engine was stopped (or never started) while a request needed it."""


class Engine:
    """Serves token streams from a chain of stages whose spans tile the model's layers."""

    def __init__(self, stages: Sequence[Stage], tokenizer: Tokenizer, *, max_batch: int = 8,
                 executor: Executor | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_context: int | None = None, kv_tokens: int | None = None,
                 max_waiting: int = DEFAULT_MAX_WAITING, wait_timeout_s: float | None = None,
                 default_max_tokens: int | None = None) -> None:
        """`kv_tokens`: KV-cache tokens over all live sequences (default: the stages' pool,
        `max_total_tokens`, else `max_context` × `max_batch`); `max_waiting` requests may wait for room, each
        at most `wait_timeout_s`; `default_max_tokens` caps a request whose `max_tokens` is None."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        if default_max_tokens is not None and default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1 (or None)")
        self.chain = StageChain(stages)
        self.stages = self.chain.stages
        config = self.chain.config
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        limits = [config.context_length, *(st.max_context or config.context_length for st in stages)]
        context = min(limits if max_context is None else [*limits, max_context])
        pools = [st.max_total_tokens for st in stages if st.max_total_tokens]
        capacity = min([*pools, *([kv_tokens] if kv_tokens else [])] or [context * max_batch])
        page = max(st.kv_page_size or 1 for st in stages)
        self.admission = Admission(AdmissionLimits(
            capacity=capacity, page_size=page, max_active=max_batch, max_waiting=max_waiting,
            wait_timeout_s=wait_timeout_s,
        ))
        self.max_context = min(context, self.admission.capacity)
        """Longest prompt + completion of one request: it must fit the KV cache alone."""
        self.default_max_tokens = default_max_tokens
        self._executor = executor
        self._owns_executor = executor is None
        self._seq_ids = itertools.count()
        self._waiting: dict[int, Request] = {}
        """Requests not yet admitted, by sequence id (their order is the admission queue's)."""
        self._prefilling: deque[Request] = deque()
        self._decoding: list[Request] = []
        self._retired: list[int] = []
        """Sequence ids whose KV caches are still to be freed in the stages."""
        self._wake = asyncio.Event()
        self._interrupt = False
        """Set (on the loop) when the loop has work for its next turn: a decode run ends after its step."""
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._rate: float | None = None
        """Recent decode throughput, tokens/s (for Retry-After hints)."""
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
        self._interrupt = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # the task's own CancelledError stays inside it
        for req in [*self._waiting.values(), *self._prefilling, *self._decoding]:
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
        """Requests waiting for admission (a batch slot and room in the KV cache)."""
        return len(self._waiting)

    @property
    def kv_reserved(self) -> int:
        """KV-cache tokens reserved by admitted requests (of `admission.capacity`)."""
        return self.admission.reserved

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
        prompt + max_tokens past the context (ContextOverflowError), a full admission queue
        (QueueFullError) or a stopped engine. The request reserves prompt + max_tokens KV tokens (None:
        `default_max_tokens`, else the rest of the context) and waits until they are free; a wait past the
        timeout ends the stream with AdmissionTimeoutError. Closing the iterator early cancels the request
        and frees its place in the queue, or its KV cache in every stage."""
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
        if params.max_tokens is not None:
            max_tokens = params.max_tokens
        else:
            max_tokens = min(room, self.default_max_tokens or room)
        if max_tokens > room:
            raise ContextOverflowError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                f"{self.max_context} tokens; lower max_tokens to at most {room}"
            )
        req = Request(seq_id=next(self._seq_ids), prompt=prompt, params=params, max_tokens=max_tokens,
                       sampler=Sampler(params, prompt, self._matcher(params)),
                       decoder=self.tokenizer.stream_decoder())
        try:
            self.admission.submit(req.seq_id, len(prompt) + max_tokens, time.monotonic(), self._rate)
        except ModelError:
            self.stats.refused = self.admission.refused
            raise
        self._waiting[req.seq_id] = req
        self._interrupt = True
        self._wake.set()
        return TokenStream(self._events(req), lambda: self._cancel(req), req.queue.qsize)

    def _matcher(self, params: SamplingParams) -> Callable[[], GrammarMatcher] | None:
        """The factory of a constrained request's grammar matcher (run by its first sampling step)."""
        constraint = params.constraint
        if constraint is None:
            return None
        vocab = self.chain.config.vocab_size
        return lambda: GrammarMatcher(constraint, self.tokenizer, vocab)

    def _cancel(self, req: Request) -> None:
        """The client left: a waiting request gives its queue place back at once; a running one is reaped
        (its KV cache freed) at the top of the loop's next turn."""
        if req.done:
            return
        req.cancelled = True
        if req.seq_id in self._waiting:
            self._retire(req)
        self._interrupt = True
        self._wake.set()

    async def _events(self, req: Request) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._cancel(req)

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
            self._interrupt = False
            await self._reap_cancelled()
            self._admit()
            if not self._prefilling and not self._decoding:
                self._wake.clear()
                if not self._has_cancelled():
                    await self._idle()
                continue
            if self._prefilling:
                await self._guarded(self._prefill_step, [self._prefilling[0]])
            if self._decoding:
                await self._guarded(self._decode_step, list(self._decoding))

    def _admit(self) -> None:
        """Start the requests the KV cache and the batch now have room for, then end the waits past the
        timeout (a request that fits now is admitted, however long it waited)."""
        now = time.monotonic()
        for seq_id in self.admission.admit(now):
            req = self._waiting.pop(seq_id)
            ticket = self.admission.ticket(seq_id)
            req.queued_s = ticket.waited_s if ticket is not None else 0.0
            self.stats.admitted += 1
            self.stats.queued_s += req.queued_s
            self._prefilling.append(req)
        for seq_id in self.admission.expire(now):
            req = self._waiting.pop(seq_id)
            self.stats.timed_out += 1
            req.done = True
            req.queue.put_nowait(AdmissionTimeoutError(
                f"the request waited {self.admission.limits.wait_timeout_s:g} s for room in the KV cache; "
                "retry later", self.admission.retry_after_s(self._rate)))

    async def _idle(self) -> None:
        """Sleep until woken, or until the oldest waiting request times out."""
        deadline = self.admission.next_deadline()
        if deadline is None:
            await self._wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation that meets the wake-up.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._wake.wait()

    async def _guarded(self, step: Any, batch: list[Request]) -> None:
        """Run a step; a failure ends only the requests it can be pinned on (the engine keeps going). A failed
        decode step of several sequences is re-run one sequence at a time for those whose KV caches no stage
        touched; the others (and a failing single sequence) end with the error."""
        try:
            await step(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("generation step failed for sequences %s", [r.seq_id for r in batch])
            live = [r for r in batch if not r.done and not r.cancelled]
            retry = step == self._decode_step and len(live) > 1
            clean = await self._in_executor(self.chain.untouched, live) if retry else []
            for req in batch:
                if req not in clean:
                    self._fail(req, exc)
            await self._free_retired()
            for req in clean:
                self.stats.retried_alone += 1
                await self._guarded(self._decode_step, [req])

    def _fail(self, req: Request, exc: BaseException) -> None:
        if not req.done:
            req.queue.put_nowait(exc)
        self._retire(req)

    def _retire(self, req: Request) -> None:
        """Take `req` off every list and release its KV reservation; its KV cache is freed by the next
        `_free_retired`."""
        req.done = True
        self._waiting.pop(req.seq_id, None)
        self.admission.release(req.seq_id)
        for queue in (self._prefilling, self._decoding):
            if req in queue:
                queue.remove(req)
        if req.in_stages:
            req.in_stages = False
            self._retired.append(req.seq_id)

    def _has_cancelled(self) -> bool:
        return bool(self._retired) or any(
            r.cancelled for r in itertools.chain(self._waiting.values(), self._prefilling, self._decoding)
        )

    async def _reap_cancelled(self) -> None:
        live = itertools.chain(self._waiting.values(), self._prefilling, self._decoding)
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
            await self._in_executor(self.chain.remove, seq_ids)
        except asyncio.CancelledError:
            raise  # the ids stay listed: stop() frees them (removal is idempotent)
        except Exception:
            logger.exception("freeing sequences %s failed", seq_ids)
        self._retired = [s for s in self._retired if s not in seq_ids]

    async def _prefill_step(self, batch: list[Request]) -> None:
        req = batch[0]
        chunk = req.prompt[req.prefilled:req.prefilled + self.prefill_chunk]
        is_last = req.prefilled + len(chunk) >= len(req.prompt)
        if not req.in_stages:
            req.in_stages = True  # set before the call: a failure half-way still frees what was added
        token = await self._in_executor(self.chain.prefill, req, chunk, is_last)
        req.prefilled += len(chunk)
        self.stats.prefill_chunks += 1
        self.stats.prefill_tokens += len(chunk)
        if is_last and not req.cancelled:
            self._prefilling.remove(req)
            self._decoding.append(req)
            self._accept(req, token)

    async def _decode_step(self, batch: list[Request]) -> None:
        batch = [r for r in batch if not r.cancelled]
        if not batch:
            return
        await self._in_executor(self._decode_run, batch, asyncio.get_running_loop())

    def _decode_run(self, batch: list[Request], loop: asyncio.AbstractEventLoop) -> None:
        """On the executor thread: decode steps of `batch` until each request ended or the loop has other
        work (`_interrupt`, a request waiting or in prefill: checked after every step). Each step's events
        are made here and posted to the loop (`_deliver`); the loop's own state is only read here. Where the
        next step waits on a peer (a split), a step's events are posted while it waits (models/idle.py)."""
        live = batch
        try:
            while live:
                started = time.monotonic()
                tokens = self.chain.decode(live)
                elapsed = time.monotonic() - started
                results: list[tuple[Request, TokenEvent | Exception | None]] = []
                for req, token in zip(live, tokens, strict=True):
                    if isinstance(token, Exception) or req.cancelled:
                        results.append((req, token if isinstance(token, Exception) else None))
                    else:
                        results.append((req, self._event(req, token)))
                live = [req for req, item in results
                        if isinstance(item, TokenEvent) and item.finish_reason is None]
                if self._interrupt or self._waiting or self._prefilling:
                    live = []
                post = functools.partial(loop.call_soon_threadsafe, self._deliver, results, elapsed)
                if live and self.chain.waits_on_peers:
                    idle.defer(post)  # posted while the next step waits on a peer
                else:
                    idle.flush()  # the last step's, if no stage of this one waited
                    post()
        finally:
            idle.flush()  # a step that failed before it waited

    def _deliver(self, results: list[tuple[Request, TokenEvent | Exception | None]], elapsed: float) -> None:
        """On the loop: one decode step's outcome (`_decode_run`) into the streams and the stats."""
        if elapsed > 0:
            rate = len(results) / elapsed
            self._rate = rate if self._rate is None else self._rate + RATE_SMOOTHING * (rate - self._rate)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(results)
        self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(results))
        for req, item in results:
            if isinstance(item, Exception):  # its sampler failed: only this request ends
                logger.error("sampling failed for sequence %d: %s", req.seq_id, item)
                self._fail(req, item)
            elif item is not None and not req.cancelled and not req.done:
                self._publish(req, item)

    # --- tokens -> events ---------------------------------------------------------------------------------

    def _accept(self, req: Request, token: int) -> None:
        """Turn a sampled token into an event and stream it (on the loop)."""
        self._publish(req, self._event(req, token))

    def _event(self, req: Request, token: int) -> TokenEvent:
        """A sampled token's event (its text, logprobs; finished on EOS, a stop string or max_tokens). Runs
        where the token was sampled, before the request's next step: it appends the token to the output."""
        found = req.sampler.last_logprobs if req.params.logprobs is not None else None
        logprobs = event_logprobs(found, token, self.tokenizer.token_bytes) if found is not None else None
        return next_event(req, token, self.tokenizer.stop_token_ids, logprobs)

    def _publish(self, req: Request, event: TokenEvent) -> None:
        req.queue.put_nowait(event)
        if event.finish_reason is not None:
            self.stats.finished += 1
            self._retire(req)  # its KV cache is freed at the top of the next turn

