"""The dialect-neutral part of serving a completion, shared by the OpenAI, Ollama and Anthropic routes.

`prepare` turns a validated `CompletionRequest` into the model, prompt ids and `SamplingParams`; `tracked`
keeps the request's record, metrics and in-flight entry; `token_events` streams the engine's (or the
router's) tokens; `collect` gathers a whole answer and `stream_frames` streams one through a dialect's
`Framer`, both turning engine errors into coded HTTP errors (or, once bytes are out, an error frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from shoal.mesh.api.busy import refusal, refused_response
from shoal.mesh.api.errors import ApiError, invalid, route_error
from shoal.mesh.api.keys import INFLIGHT, NODE, ROUTER
from shoal.mesh.api.openai_schema import CompletionRequest
from shoal.mesh.api.ports import NodePort, RouterPort
from shoal.mesh.api.progress import ProgressFeed, ProgressPump
from shoal.mesh.api.records import RequestRecord
from shoal.mesh.route import RouteChoice, RouteFailed
from shoal.models.admission import AdmissionError
from shoal.models.errors import ContextOverflowError, ModelError, ModelMemoryBudgetError, ModelNotFoundError
from shoal.models.generate import EventLogprobs, TokenEvent
from shoal.models.grammar import GrammarError, check_constraint
from shoal.models.sampling import SamplingParams
from shoal.models.served import Servable
from shoal.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SHUTDOWN_ERROR = {"message": "the node is shutting down", "type": "server_error", "param": None,
                  "code": "shutdown"}
GENERATION_FAILED = {"message": "generation failed; see the node's log", "type": "server_error",
                     "param": None, "code": "generation_failed"}


def _context_error(prompt_tokens: int, max_tokens: int, context: int, prompt_param: str) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
        "completion). Please reduce the length of the prompt or the completion.",
        param=prompt_param if prompt_tokens >= context else "max_tokens",
        code="context_length_exceeded",
    )


async def acquire_model(node: NodePort, router: RouterPort | None, name: str) -> Servable:
    """The model, loaded here; or, when this node does not hold it (or holds it but its memory budget cannot
    load it), a stand-in that the router offloads or splits over the mesh's members
    (mesh.split.router.Router.remote_model)."""
    try:
        return await node.models.acquire(name)
    except (ModelNotFoundError, ModelMemoryBudgetError):
        remote = await router.remote_model(name) if router is not None else None
        if remote is None:
            raise
        return remote


async def prepare(
    request: web.Request, req: CompletionRequest, body: dict[str, Any]
) -> tuple[Servable, list[int], SamplingParams]:
    """A validated request's model, prompt ids and sampling parameters (the model's `sampling_defaults`
    under the request's own values); 503 while the node drains, 400 naming the bad field (`body` is the
    request as `parse_completion_request` read it)."""
    node = request.app[NODE]
    if node.draining:
        raise ApiError(503, "the node is shutting down", code="shutdown", type="server_error")
    served = await acquire_model(node, request.app[ROUTER], req.model or node.config.models.default)
    if req.keep_alive is not None:  # `shoal.keep_alive`: how long it stays loaded after this request
        node.models.set_keep_alive(served.name, req.keep_alive)
    context = served.context_length
    if req.max_tokens is not None and req.max_tokens > context:
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise invalid(f"'{param}' is {req.max_tokens}, above the model's context length {context}", param)
    loop = asyncio.get_running_loop()
    if req.messages is not None:
        try:
            prompt_ids = await loop.run_in_executor(None, served.tokenizer.encode_chat, req.messages)
        except ValueError as exc:
            raise invalid(str(exc), "messages") from None
    elif isinstance(req.prompt, str):
        prompt_ids = await loop.run_in_executor(None, served.tokenizer.encode, req.prompt)
    else:
        prompt_ids = list(req.prompt or [])
        vocab = served.tokenizer.vocab_size
        if prompt_ids and max(prompt_ids) >= vocab:
            raise invalid(f"token ids in 'prompt' must be below the vocabulary size {vocab}", "prompt")
    if not prompt_ids:
        raise invalid("the prompt is empty; send at least one token of text", "prompt")
    if req.max_tokens is None:
        if req.kind == "chat":  # the rest of the context, capped by `[models] default_max_tokens`
            default = min(context - len(prompt_ids), node.config.models.default_max_tokens)
        else:
            default = DEFAULT_COMPLETION_MAX_TOKENS
        max_tokens = max(1, default)
    else:
        max_tokens = req.max_tokens
    if len(prompt_ids) + max_tokens > context:
        raise _context_error(len(prompt_ids), max_tokens, context, "messages" if req.messages else "prompt")
    try:
        params = SamplingParams(max_tokens=max_tokens, **{**served.sampling_defaults, **req.sampling})
    except ValueError as exc:
        first_word = str(exc).split(" ", 1)[0]
        raise invalid(str(exc), first_word if first_word in body else None) from None
    tokenizer = served.engine.tokenizer if served.engine is not None else served.tokenizer
    if params.constraint is not None and isinstance(tokenizer, Tokenizer):  # else the peer checks it
        try:
            await loop.run_in_executor(None, check_constraint, params.constraint, tokenizer,
                                       served.config.vocab_size)
        except GrammarError as exc:
            raise invalid(str(exc), "tools" if req.tools is not None else "response_format") from None
    return served, prompt_ids, params


@dataclass
class Run:
    """One request being served: its record, and its outcome for the metrics (`stop`, `length`, `error`,
    `refused`, `cancelled`, `shutdown`)."""

    record: RequestRecord
    status: str = "error"


@contextlib.asynccontextmanager
async def tracked(
    request: web.Request, served: Servable, prompt_ids: list[int], prefix: str
) -> AsyncIterator[Run]:
    """Serve one request: its record (id `prefix-...`), in-flight set, queue depth, completion metric and log
    line. The handler sets `run.status`; a cancelled handler counts as `cancelled` (`shutdown` when the node
    drains)."""
    node = request.app[NODE]
    run = Run(node.requests.start(served.name, prefix))
    record = run.record
    record.prompt_tokens = len(prompt_ids)
    task = asyncio.current_task()
    inflight = request.app[INFLIGHT]
    if task is not None:
        inflight.add(task)  # type: ignore[arg-type]
    node.metrics.queue_depth.inc()
    try:
        with node.models.hold(served.name):  # not unloaded while it runs; keep_alive counts from the end
            yield run
    except asyncio.CancelledError:
        run.status = "shutdown" if node.draining else "cancelled"
        raise
    finally:
        node.metrics.queue_depth.dec()
        if task is not None:
            inflight.discard(task)  # type: ignore[arg-type]
        node.metrics.completions.labels(served.name, run.status).inc()
        node.requests.finish(record, run.status)
        logger.info(
            "%s %s: %s, %d prompt + %d completion tokens, ttft %s ms",
            record.id,
            served.name,
            run.status,
            record.prompt_tokens,
            record.tokens,
            "-" if record.ttft_ms is None else f"{record.ttft_ms:.1f}",
        )


async def token_events(
    request: web.Request,
    served: Servable,
    prompt_ids: list[int],
    params: SamplingParams,
    record: RequestRecord,
    choice: RouteChoice,
) -> AsyncIterator[TokenEvent]:
    """The engine's token events, with metrics; the engine stream is closed whatever happens."""
    metrics = request.app[NODE].metrics
    router = request.app[ROUTER]  # local / offload / split, when the node has a router
    if router is not None:
        source = router.stream(served, prompt_ids, params, record.route, choice)
    elif choice.mode not in ("auto", "local"):
        raise ApiError(503, "this node has no mesh router, so requests run locally only", param="shoal.route",
                       code="no_route", type="server_error")
    elif served.engine is not None:
        source = served.engine.stream(prompt_ids, params)
    else:
        raise ModelError(f"{served.name} runs on a peer, and this node has no router to reach it")
    async with contextlib.aclosing(source) as events:
        async for event in events:
            gap = record.token()
            if gap is None:
                metrics.ttft.labels(served.name).observe(record.ttft_s or 0.0)
                metrics.admission_wait.labels(served.name).observe(event.queued_s)
            else:
                metrics.token_latency.labels(served.name).observe(gap)
            yield event
    if router is not None:
        router.observe(served.name, record)


def count_tokens(request: web.Request, served: Servable, prompt_tokens: int, completion_tokens: int) -> None:
    metrics = request.app[NODE].metrics
    metrics.prompt_tokens.labels(served.name).inc(prompt_tokens)
    metrics.completion_tokens.labels(served.name).inc(completion_tokens)


@dataclass
class Collected:
    """A whole answer: its text, why it ended, token counts and (when asked for) per-token logprobs."""

    text: str
    finish: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[EventLogprobs] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    stop_sequence: str | None = None
    """The stop string that ended the answer (None: a stop token, the length limit, or not known)."""


async def collect(
    request: web.Request,
    req: CompletionRequest,
    served: Servable,
    prompt_ids: list[int],
    params: SamplingParams,
    record: RequestRecord,
) -> Collected | web.Response:
    """Generate the whole answer; a KV-admission refusal comes back as its 429/503 response, other engine
    refusals raise a coded `ApiError`."""
    parts: list[str] = []
    out = Collected("", "length", len(prompt_ids), 0)
    try:
        async for event in token_events(request, served, prompt_ids, params, record, req.route):
            parts.append(event.text)
            out.token_ids.append(event.token_id)
            out.completion_tokens = event.completion_tokens
            out.prompt_tokens = event.prompt_tokens
            if event.logprobs is not None:
                out.logprobs.append(event.logprobs)
            if event.finish_reason is not None:
                out.finish = event.finish_reason
                out.stop_sequence = event.stop_sequence
    except ContextOverflowError as exc:
        raise ApiError(400, str(exc), code="context_length_exceeded") from None
    except ValueError as exc:  # the engine refused the prompt before any work
        raise invalid(str(exc), "prompt") from None
    except AdmissionError as exc:  # no room in the KV cache: 429 / 503 with Retry-After
        return refused_response(request.app[NODE].metrics, served.name, exc)
    count_tokens(request, served, out.prompt_tokens, out.completion_tokens)
    out.text = "".join(parts)
    return out


class Framer(Protocol):
    """How one dialect writes a streamed answer. `open` starts the response (called once the first token is
    in, so errors before it are still plain HTTP errors); `error` writes an error frame and ends it. A framer
    that can show progress (an SSE dialect: `mesh.api.progress`) also has `async progress(report)`; its
    response then opens at the first report of a wait (after ~1 s without a token), and errors after that
    are error frames."""

    response: web.StreamResponse | None

    async def open(self, request: web.Request) -> None: ...

    async def token(self, event: TokenEvent) -> None: ...

    async def finish(self, done: Collected) -> None: ...

    async def error(self, error: dict[str, Any]) -> None: ...


async def stream_frames(
    request: web.Request,
    req: CompletionRequest,
    served: Servable,
    prompt_ids: list[int],
    params: SamplingParams,
    record: RequestRecord,
    framer: Framer,
) -> tuple[web.StreamResponse, str]:
    """Stream the answer through `framer`; returns the response and the outcome (stop, length, refused,
    cancelled, error). While the client waits, what for goes out as progress (`mesh.api.progress`)."""
    done = Collected("", "length", len(prompt_ids), 0)
    gate = _OpenGate(request, framer)
    node = request.app[NODE]
    engine = served.engine
    depth = (lambda: engine.queue_depth) if engine is not None else None
    pump = ProgressPump(ProgressFeed(asyncio.get_running_loop()), gate.progress, model=served.name,
                        bus=node.bus, queue_depth=depth)
    record.route.listener = pump.feed.push
    pump.start()
    try:
        tokens = token_events(request, served, prompt_ids, params, record, req.route)
        async with contextlib.aclosing(tokens):
            event = await anext(tokens, None)
            pump.first_token()
            await gate.open()
            while event is not None:
                done.completion_tokens = event.completion_tokens
                done.prompt_tokens = event.prompt_tokens
                if event.finish_reason is not None:
                    done.finish = event.finish_reason
                    done.stop_sequence = event.stop_sequence
                await framer.token(event)
                event = await anext(tokens, None)
        await pump.stop()
        await framer.finish(done)
        return _response(framer), done.finish
    except ConnectionResetError:
        logger.info("%s: client went away mid-stream; generation cancelled", record.id)
        return (framer.response or web.Response(status=499)), "cancelled"
    except asyncio.CancelledError:
        await pump.stop()
        if request.app[NODE].draining and gate.opened:
            with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
                async with asyncio.timeout(1.0):  # wait_for can lose a cancellation (3.11)
                    await framer.error(SHUTDOWN_ERROR)
        raise
    except ContextOverflowError as exc:
        error = ApiError(400, str(exc), code="context_length_exceeded")
        await pump.stop()
        if not gate.opened:
            raise error from None
        await framer.error(error.body()["error"])
        return _response(framer), "error"
    except AdmissionError as exc:  # before the first token, so before any byte was sent
        await pump.stop()
        if not gate.opened:
            return refused_response(request.app[NODE].metrics, served.name, exc), "refused"
        await framer.error(refusal(exc).body()["error"])
        return _response(framer), "error"
    except ApiError as exc:
        await pump.stop()
        if not gate.opened:
            raise
        await framer.error(exc.body()["error"])
        return _response(framer), "error"
    except RouteFailed as exc:
        await pump.stop()
        if not gate.opened:
            raise
        await framer.error(route_error(exc).body()["error"])
        return _response(framer), "error"
    except ValueError as exc:
        await pump.stop()
        if not gate.opened:
            raise invalid(str(exc), "prompt") from None
        logger.exception("%s: generation failed", record.id)
        await framer.error({"message": str(exc), "type": "server_error", "param": None,
                            "code": "generation_failed"})
        return _response(framer), "error"
    except Exception:
        logger.exception("%s: generation failed", record.id)
        await pump.stop()
        if not gate.opened:
            raise
        await framer.error(GENERATION_FAILED)
        return _response(framer), "error"
    finally:
        record.route.listener = None
        await pump.stop()
        count_tokens(request, served, done.prompt_tokens, done.completion_tokens)


class _OpenGate:
    """Opens the framer's response once, whichever comes first: the first token or the first progress
    report."""

    def __init__(self, request: web.Request, framer: Framer) -> None:
        self._request = request
        self._framer = framer
        self._lock = asyncio.Lock()
        self.opened = False

    async def open(self) -> None:
        async with self._lock:
            if not self.opened:
                await self._framer.open(self._request)
                self.opened = True

    async def progress(self, report: dict[str, Any]) -> None:
        write = getattr(self._framer, "progress", None)
        if write is None:  # this dialect has no place for progress (NDJSON lines are all answer objects)
            return
        await self.open()
        await write(report)


def _response(framer: Framer) -> web.StreamResponse:
    assert framer.response is not None  # set by open()
    return framer.response
