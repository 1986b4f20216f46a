"""OpenAI-compatible endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

A completion request is validated (`mesh.openai_schema`), its prompt tokenized off the event loop, checked
against the model's context, and streamed from the model's `Engine`. The engine stream is always closed
(`aclosing`), so a client that disconnects (aiohttp cancels its handler) or a failed write frees the sequence
and its KV cache at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from shoal.mesh.api.busy import refusal, refused_response
from shoal.mesh.api.errors import ApiError, invalid, json_response, route_error
from shoal.mesh.api.keys import INFLIGHT, NODE, ROUTE_HEADER, ROUTER
from shoal.mesh.api.logprobs import for_kind
from shoal.mesh.api.openai_schema import ROUTE_HEADER_IN, CompletionRequest, parse_completion_request
from shoal.mesh.api.ports import NodePort, RouterPort
from shoal.mesh.api.records import RequestRecord
from shoal.mesh.api.sse import SseWriter, open_sse
from shoal.mesh.route import RouteChoice, RouteFailed
from shoal.models.admission import AdmissionError
from shoal.models.errors import ContextOverflowError, ModelError, ModelNotFoundError
from shoal.models.generate import EventLogprobs, TokenEvent
from shoal.models.sampling import SamplingParams
from shoal.models.served import Servable

logger = logging.getLogger(__name__)

ABSURD_MAX_TOKENS = 1 << 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SHUTDOWN_ERROR = {
    "message": "the node is shutting down",
    "type": "server_error",
    "param": None,
    "code": "shutdown",
}


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; 413 when over the size limit, 400 when not JSON."""
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if not raw:
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


async def list_models(request: web.Request) -> web.Response:
    models = request.app[NODE].models
    await models.refresh_async()
    return json_response({"object": "list", "data": models.list_models()})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "text")


def _context_error(prompt_tokens: int, max_tokens: int, context: int, prompt_param: str) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
        "completion). Please reduce the length of the prompt or the completion.",
        param=prompt_param if prompt_tokens >= context else "max_tokens",
        code="context_length_exceeded",
    )


async def _acquire(node: NodePort, router: RouterPort | None, name: str) -> Servable:
    """The model, loaded here; or, when this node does not hold it, a stand-in for a peer that serves it
    (the router then offloads the request: mesh.split.router.Router.remote_model)."""
    try:
        return await node.models.acquire(name)
    except ModelNotFoundError:
        remote = await router.remote_model(name) if router is not None else None
        if remote is None:
            raise
        return remote


async def _prepare(
    request: web.Request, kind: str
) -> tuple[CompletionRequest, Servable, list[int], SamplingParams]:
    body = await read_json(request)
    req = parse_completion_request(body, kind, ABSURD_MAX_TOKENS,  # type: ignore[arg-type]
                                   request.headers.get(ROUTE_HEADER_IN))
    served, prompt_ids, params = await prepare(request, req, body)
    return req, served, prompt_ids, params


async def prepare(
    request: web.Request, req: CompletionRequest, body: dict[str, Any]
) -> tuple[Servable, list[int], SamplingParams]:
    """A validated request's model, prompt ids and sampling parameters (the model's `sampling_defaults`
    under the request's own values); 503 while the node drains, 400 naming the bad field (`body` is the
    request as `parse_completion_request` read it)."""
    node = request.app[NODE]
    if node.draining:
        raise ApiError(503, "the node is shutting down", code="shutdown", type="server_error")
    served = await _acquire(node, request.app[ROUTER], req.model or node.config.models.default)
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
    return served, prompt_ids, params


async def _complete(request: web.Request, kind: str) -> web.StreamResponse:
    req, served, prompt_ids, params = await _prepare(request, kind)
    async with tracked(request, served, prompt_ids, "chatcmpl" if kind == "chat" else "cmpl") as run:
        if req.stream:
            response, run.status = await _stream(request, req, served, prompt_ids, params, run.record)
        else:
            response, run.status = await _collect(request, req, served, prompt_ids, params, run.record)
        return response


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


async def _tokens(
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
                metrics.admission_wait.labels(served.name).observe(getattr(event, "queued_s", 0.0))
            else:
                metrics.token_latency.labels(served.name).observe(gap)
            yield event
    if router is not None:
        router.observe(served.name, record)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _count(request: web.Request, served: Servable, prompt_tokens: int, completion_tokens: int) -> None:
    metrics = request.app[NODE].metrics
    metrics.prompt_tokens.labels(served.name).inc(prompt_tokens)
    metrics.completion_tokens.labels(served.name).inc(completion_tokens)


async def _collect(
    request: web.Request,
    req: CompletionRequest,
    served: Servable,
    prompt_ids: list[int],
    params: SamplingParams,
    record: RequestRecord,
) -> tuple[web.Response, str]:
    parts: list[str] = []
    logprobs: list[EventLogprobs] = []
    finish = "length"
    completion_tokens = 0
    prompt_tokens = len(prompt_ids)
    try:
        async for event in _tokens(request, served, prompt_ids, params, record, req.route):
            parts.append(event.text)
            if event.logprobs is not None:
                logprobs.append(event.logprobs)
            completion_tokens = event.completion_tokens
            prompt_tokens = event.prompt_tokens
            if event.finish_reason is not None:
                finish = event.finish_reason
    except ContextOverflowError as exc:
        raise ApiError(400, str(exc), code="context_length_exceeded") from None
    except ValueError as exc:  # the engine refused the prompt before any work
        raise invalid(str(exc), "prompt") from None
    except AdmissionError as exc:  # no room in the KV cache: 429 / 503 with Retry-After
        return refused_response(request.app[NODE].metrics, served.name, exc), "refused"
    _count(request, served, prompt_tokens, completion_tokens)
    text = "".join(parts)
    created = int(record.started)
    if req.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": for_kind(req.kind, logprobs) if params.logprobs is not None else None,
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        found = for_kind(req.kind, logprobs) if params.logprobs is not None else None
        choice = {"text": text, "index": 0, "logprobs": found, "finish_reason": finish}
        obj = "text_completion"
    body = {
        "id": record.id,
        "object": obj,
        "created": created,
        "model": served.name,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": _usage(prompt_tokens, completion_tokens),
        "shoal_route": record.route.to_dict(),
    }
    return json_response(body, headers={ROUTE_HEADER: record.route.kind}), finish


def _chunk(
    req: CompletionRequest, record: RequestRecord, served: Servable, created: int, **choice: Any
) -> dict:
    if req.kind == "chat":
        body = {
            "id": record.id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": served.name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "logprobs": None, "finish_reason": None, **choice}],
        }
    else:
        body = {
            "id": record.id,
            "object": "text_completion",
            "created": created,
            "model": served.name,
            "system_fingerprint": None,
            "choices": [
                {
                    "text": choice.get("delta", {}).get("content", ""),
                    "index": 0,
                    "logprobs": choice.get("logprobs"),
                    "finish_reason": choice.get("finish_reason"),
                }
            ],
        }
    if req.include_usage:
        body["usage"] = None
    return body


async def _stream(
    request: web.Request,
    req: CompletionRequest,
    served: Servable,
    prompt_ids: list[int],
    params: SamplingParams,
    record: RequestRecord,
) -> tuple[web.StreamResponse, str]:
    """Stream SSE chunks; returns the response and the outcome (stop, length, cancelled, error)."""
    created = int(record.started)
    prompt_tokens = len(prompt_ids)
    completion_tokens = 0
    finish = "length"
    sse: SseWriter | None = None
    held: list[EventLogprobs] = []
    offset = 0
    try:
        tokens = _tokens(request, served, prompt_ids, params, record, req.route)
        async with contextlib.aclosing(tokens):
            first = await _first(tokens)
            sse = await open_sse(request, {ROUTE_HEADER: record.route.kind})
            if req.kind == "chat":
                await sse.send(
                    _chunk(req, record, served, created, delta={"role": "assistant", "content": ""})
                )
            event = first
            while event is not None:
                completion_tokens = event.completion_tokens
                prompt_tokens = event.prompt_tokens
                if event.finish_reason is not None:
                    finish = event.finish_reason
                if event.logprobs is not None:
                    held.append(event.logprobs)
                if event.text:
                    extra = {"logprobs": for_kind(req.kind, held, offset)} if held else {}
                    delta = {"content": event.text}
                    await sse.send(_chunk(req, record, served, created, delta=delta, **extra))
                    offset += len(event.text)
                    held = []
                event = await anext(tokens, None)
        extra = {"logprobs": for_kind(req.kind, held, offset)} if held else {}
        final = _chunk(req, record, served, created, delta={}, finish_reason=finish, **extra)
        final["shoal_route"] = record.route.to_dict()
        await sse.send(final)
        if req.include_usage:
            await sse.send(
                {
                    **_chunk(req, record, served, created),
                    "choices": [],
                    "usage": _usage(prompt_tokens, completion_tokens),
                }
            )
        await sse.done()
        return sse.response, finish
    except ConnectionResetError:
        logger.info("%s: client went away mid-stream; generation cancelled", record.id)
        return (sse.response if sse is not None else web.Response(status=499)), "cancelled"
    except asyncio.CancelledError:
        if request.app[NODE].draining and sse is not None:
            with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
                await asyncio.wait_for(_send_error(sse, SHUTDOWN_ERROR), timeout=1.0)
        raise
    except ContextOverflowError as exc:
        if sse is None:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        await _send_error(
            sse,
            {
                "message": str(exc),
                "type": "invalid_request_error",
                "param": None,
                "code": "context_length_exceeded",
            },
        )
        return sse.response, "error"
    except AdmissionError as exc:  # before the first token, so before any byte was sent
        if sse is None:
            return refused_response(request.app[NODE].metrics, served.name, exc), "refused"
        await _send_error(sse, refusal(exc).body()["error"])
        return sse.response, "error"
    except ApiError:
        raise
    except RouteFailed as exc:
        if sse is None:
            raise
        await _send_error(sse, route_error(exc).body()["error"])
        return sse.response, "error"
    except ValueError as exc:
        if sse is None:
            raise invalid(str(exc), "prompt") from None
        logger.exception("%s: generation failed", record.id)
        await _send_error(
            sse, {"message": str(exc), "type": "server_error", "param": None, "code": "generation_failed"}
        )
        return sse.response, "error"
    except Exception:
        logger.exception("%s: generation failed", record.id)
        if sse is None:
            raise
        await _send_error(
            sse,
            {
                "message": "generation failed; see the node's log",
                "type": "server_error",
                "param": None,
                "code": "generation_failed",
            },
        )
        return sse.response, "error"
    finally:
        _count(request, served, prompt_tokens, completion_tokens)


async def _first(tokens: AsyncIterator[TokenEvent]) -> TokenEvent | None:
    """The first event, before any byte is sent: errors here still become proper HTTP errors."""
    return await anext(tokens, None)


async def _send_error(sse: SseWriter, error: dict[str, Any]) -> None:
    await sse.send({"error": error})
    await sse.done()


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
