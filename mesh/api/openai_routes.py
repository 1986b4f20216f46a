"""OpenAI-compatible endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

A completion request is validated (`mesh.openai_schema`), its prompt tokenized off the event loop, checked
against the model's context, and streamed from the model's `Engine` (`mesh.api.generation`, shared with the
Ollama and Anthropic dialects). The engine stream is always closed (`aclosing`), so a client that disconnects
(aiohttp cancels its handler) or a failed write frees the sequence and its KV cache at once.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from shoal.mesh.api.errors import ApiError, json_response
from shoal.mesh.api.generation import Collected, collect, prepare, stream_frames, tracked
from shoal.mesh.api.keys import NODE, ROUTE_HEADER
from shoal.mesh.api.logprobs import for_kind
from shoal.mesh.api.openai_schema import ROUTE_HEADER_IN, CompletionRequest, parse_completion_request
from shoal.mesh.api.progress import EARLY_STREAM, comment_text, while_loading
from shoal.mesh.api.records import RequestRecord
from shoal.mesh.api.sse import SseWriter, open_sse
from shoal.mesh.api.structured import ToolCallStream, parse_call
from shoal.models.generate import EventLogprobs, TokenEvent
from shoal.models.sampling import SamplingParams
from shoal.models.served import Servable

logger = logging.getLogger(__name__)

ABSURD_MAX_TOKENS = 1 << 20


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
    data = models.list_models()
    memory = models.memory()  # the loaded models' estimates against the node's budget
    return json_response({"object": "list", "data": data,
                          "shoal": {"memory_budget": memory["budget"], "memory_used": memory["used"]}})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "text")


async def _prepare(
    request: web.Request, kind: str
) -> tuple[CompletionRequest, Servable, list[int], SamplingParams]:
    body = await read_json(request)
    req = parse_completion_request(body, kind, ABSURD_MAX_TOKENS,  # type: ignore[arg-type]
                                   request.headers.get(ROUTE_HEADER_IN))
    preparing = prepare(request, req, body)
    if req.stream:  # a model still loading (or compiling) here is reported on the opened stream
        model = req.model or request.app[NODE].config.models.default
        served, prompt_ids, params = await while_loading(request, preparing, model)
    else:
        served, prompt_ids, params = await preparing
    return req, served, prompt_ids, params


async def _complete(request: web.Request, kind: str) -> web.StreamResponse:
    try:
        req, served, prompt_ids, params = await _prepare(request, kind)
    except Exception as exc:
        early = request.get(EARLY_STREAM)
        if early is None:
            raise
        return await _early_error(request, early, exc)
    async with tracked(request, served, prompt_ids, "chatcmpl" if kind == "chat" else "cmpl") as run:
        if req.stream:
            response, run.status = await _stream(request, req, served, prompt_ids, params, run.record)
        else:
            response, run.status = await _collect(request, req, served, prompt_ids, params, run.record)
        return response


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _collect(
    request: web.Request,
    req: CompletionRequest,
    served: Servable,
    prompt_ids: list[int],
    params: SamplingParams,
    record: RequestRecord,
) -> tuple[web.Response, str]:
    done = await collect(request, req, served, prompt_ids, params, record)
    if isinstance(done, web.Response):
        return done, "refused"
    logprobs = for_kind(req.kind, done.logprobs) if params.logprobs is not None else None
    if req.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": done.text, "refusal": None}
        call = parse_call(done.text) if req.tools is not None else None
        if call is not None:
            message.update(content=None, tool_calls=[call])
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": "tool_calls" if call is not None else done.finish,
        }
        obj = "chat.completion"
    else:
        choice = {"text": done.text, "index": 0, "logprobs": logprobs, "finish_reason": done.finish}
        obj = "text_completion"
    body = {
        "id": record.id,
        "object": obj,
        "created": int(record.started),
        "model": served.name,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": _usage(done.prompt_tokens, done.completion_tokens),
        "shoal_route": record.route.to_dict(),
    }
    return json_response(body, headers={ROUTE_HEADER: record.route.kind}), done.finish


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


class _SseFramer:
    """OpenAI's SSE chunks: a role chunk (chat), one chunk per piece of text (with its tokens' logprobs), a
    final chunk with the finish reason, a usage chunk when asked for, then `[DONE]`."""

    def __init__(self, req: CompletionRequest, record: RequestRecord, served: Servable) -> None:
        self.req = req
        self.record = record
        self.served = served
        self.created = int(record.started)
        self.response: web.StreamResponse | None = None
        self._sse: SseWriter | None = None
        self._held: list[EventLogprobs] = []
        self._offset = 0
        self._calls = ToolCallStream() if req.tools is not None else None

    def _logprobs(self) -> dict[str, Any]:
        found = {"logprobs": for_kind(self.req.kind, self._held, self._offset)} if self._held else {}
        self._held = []
        return found

    async def _send(self, payload: Any) -> None:
        assert self._sse is not None
        await self._sse.send(payload)

    async def open(self, request: web.Request) -> None:
        early = request.get(EARLY_STREAM)  # opened while the model loaded (no route header then)
        if early is None:
            early = await open_sse(request, {ROUTE_HEADER: self.record.route.kind})
        self._sse = early
        self.response = self._sse.response
        if self.req.kind == "chat":
            await self._send(self._chunk(delta={"role": "assistant", "content": ""}))

    async def progress(self, report: dict[str, Any]) -> None:
        """An SSE comment (`: shoal progress {...}`): the official client skips comment lines."""
        assert self._sse is not None
        await self._sse.comment(comment_text(report))

    async def token(self, event: TokenEvent) -> None:
        if event.logprobs is not None:
            self._held.append(event.logprobs)
        if event.text and self._calls is not None:
            for delta in self._calls.push(event.text):
                await self._send(self._chunk(delta=delta, **self._logprobs()))
        elif event.text:
            await self._send(self._chunk(delta={"content": event.text}, **self._logprobs()))
            self._offset += len(event.text)

    async def finish(self, done: Collected) -> None:
        finish = done.finish
        if self._calls is not None:
            for delta in self._calls.finish():
                await self._send(self._chunk(delta=delta))
            finish = "tool_calls" if self._calls.is_call and finish == "stop" else finish
        final = self._chunk(delta={}, finish_reason=finish, **self._logprobs())
        final["shoal_route"] = self.record.route.to_dict()
        await self._send(final)
        if self.req.include_usage:
            usage = _usage(done.prompt_tokens, done.completion_tokens)
            await self._send({**self._chunk(), "choices": [], "usage": usage})
        assert self._sse is not None
        await self._sse.done()

    async def error(self, error: dict[str, Any]) -> None:
        if self._sse is not None:
            await self._sse.send({"error": error})
            await self._sse.done()

    def _chunk(self, **choice: Any) -> dict:
        return _chunk(self.req, self.record, self.served, self.created, **choice)


async def _stream(
    request: web.Request,
    req: CompletionRequest,
    served: Servable,
    prompt_ids: list[int],
    params: SamplingParams,
    record: RequestRecord,
) -> tuple[web.StreamResponse, str]:
    """Stream SSE chunks; returns the response and the outcome (stop, length, cancelled, error)."""
    framer = _SseFramer(req, record, served)
    return await stream_frames(request, req, served, prompt_ids, params, record, framer)


async def _early_error(request: web.Request, sse: SseWriter, exc: Exception) -> web.StreamResponse:
    """A request whose stream opened while its model loaded, then failed: the error the API would have
    answered (status and body as `app.error_middleware` makes them) as an error frame, then `[DONE]`."""
    from shoal.mesh.api.app import error_middleware  # the app imports this module

    async def fail(_: web.Request) -> web.StreamResponse:
        raise exc

    answer = await error_middleware(request, fail)
    body = getattr(answer, "body", None)
    try:
        error = orjson.loads(body)["error"] if isinstance(body, bytes) else None
    except (orjson.JSONDecodeError, KeyError, TypeError):
        error = None
    await sse.send({"error": error or {"message": "the request failed", "type": "server_error", "param": None,
                                       "code": None}})
    await sse.done()
    return sse.response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
