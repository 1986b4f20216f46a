"""What the engine streams and the state of one request: `TokenEvent`, `TokenStream`, `Generation`,
`EngineStats`, `Request`, and the pure step from a sampled token to the next event (`next_event`).

`models.generate` re-exports the public names; import them from there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from shoal.models.sampling import Sampler, SamplingParams, split_at_stop
from shoal.models.tokenizer import StreamDecoder

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenLogprob:
    """One token and its log-probability (natural log), as OpenAI's `logprobs` report it."""

    token_id: int
    token: str
    """The token's text (its bytes decoded as UTF-8, a cut character as U+FFFD)."""
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class EventLogprobs:
    """The chosen token's log-probability and the most likely tokens at its step (most likely first)."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...] = ()


def event_logprobs(found: tuple[float, list[tuple[int, float]]], token: int,
                   token_bytes: Callable[[int], bytes]) -> EventLogprobs:
    """`Sampler.last_logprobs` of `token` as an `EventLogprobs`, with each token's text and bytes."""

    def entry(token_id: int, logprob: float) -> TokenLogprob:
        raw = token_bytes(token_id)
        return TokenLogprob(token_id, raw.decode("utf-8", errors="replace"), raw, logprob)

    logprob, top = found
    return EventLogprobs(entry(token, logprob), tuple(entry(i, lp) for i, lp in top))


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
    queued_s: float = 0.0
    """Seconds the request waited for admission (room in the KV cache, a batch slot)."""
    logprobs: EventLogprobs | None = None
    """Set when the request asked for logprobs (`SamplingParams.logprobs`) and the stage gave logits."""
    stop_sequence: str | None = None
    """On the last event, when a stop string (not a stop token) ended the request: that string."""


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
    admitted: int = 0
    queued_s: float = 0.0
    """Total seconds admitted requests waited for admission."""
    refused: int = 0
    """Requests refused because the admission queue was full."""
    timed_out: int = 0
    """Requests ended because they waited past the admission timeout."""
    retried_alone: int = 0
    """Sequences re-run one at a time after a batched decode step failed."""


@dataclass(eq=False)
class Request:
    """One request's state, owned by the engine's loop."""

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
    queued_s: float = 0.0
    in_stages: bool = False
    done: bool = False
    cancelled: bool = False


def next_event(req: Request, token: int, stop_token_ids: Collection[int],
               logprobs: EventLogprobs | None = None) -> TokenEvent:
    """Append `token` to `req`'s output and make its event; it finishes the request on a stop token, a stop
    string or max_tokens."""
    req.output.append(token)
    finish: FinishReason | None = None
    matched: str | None = None
    if token in stop_token_ids:
        text = req.pending + req.decoder.flush()
        req.pending = ""
        finish = "stop"
    else:
        combined = req.pending + req.decoder.push(token)
        text, req.pending, stopped = split_at_stop(combined, req.params.stop)
        finish = "stop" if stopped else None
        if stopped:
            found = [(i, s) for s in req.params.stop if (i := combined.find(s)) >= 0]
            matched = min(found)[1]
        if finish is None and len(req.output) >= req.max_tokens:
            text += req.pending + req.decoder.flush()
            req.pending = ""
            finish = "length"
    return TokenEvent(token_id=token, text=text, finish_reason=finish, prompt_tokens=len(req.prompt),
                      completion_tokens=len(req.output), queued_s=req.queued_s, logprobs=logprobs,
                      stop_sequence=matched)


def sample_row(req: Request, row: np.ndarray) -> int | Exception:
    """The next token of one request of a batch, or the error its sampler raised (it ends that one alone)."""
    try:
        return req.sampler.next_token(row)
    except Exception as exc:
        return exc


class TokenStream:
    """A request's token stream: the engine's event generator, whose `aclose()` also cancels a request whose
    stream was never iterated (an unstarted generator's `finally` never runs)."""

    def __init__(self, events: AsyncGenerator[TokenEvent, None], cancel: Callable[[], None],
                 queued: Callable[[], int] = lambda: 0) -> None:
        """`queued()`: how many events are ready to be taken without waiting."""
        self._events = events
        self._cancel = cancel
        self._queued = queued

    def queued(self) -> int:
        """Events already produced and not yet taken: that many `__anext__` calls complete without waiting
        (a consumer that fell behind can take them together, e.g. into one network frame)."""
        return self._queued()

    def __aiter__(self) -> TokenStream:
        return self

    def __anext__(self) -> Awaitable[TokenEvent]:
        return self._events.__anext__()

    async def aclose(self) -> None:
        self._cancel()
        await self._events.aclose()
