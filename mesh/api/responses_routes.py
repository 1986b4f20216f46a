"""OpenAI's Responses API, `POST /v1/responses`, for text answers.

`input` (a string, or messages whose content is a string or `input_text` parts), `instructions` (a system
message), `max_output_tokens`, `temperature`, `top_p`, `text.format` (`text`, `json_object`, `json_schema`,
enforced by the grammar path) and `stream` are rewritten into a chat request and run through
`mesh.api.generation`. The answer is one `message` output item with an `output_text` part; `status` is
`completed`, or `incomplete` with `incomplete_details.reason: "max_output_tokens"`. Streaming sends the typed
events `response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`, `response.output_text.done`,
`response.content_part.done`, `response.output_item.done`, `response.completed` (also when the answer was
cut short; its `status` says so), or `error` once streaming. Not yet (400 naming the field): `tools`,
`previous_response_id`, `conversation`, `reasoning`, non-text input parts.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from aiohttp import web
from shoal.mesh.api.errors import ApiError, invalid, json_response
from shoal.mesh.api.generation import Collected, collect, prepare, stream_frames, tracked
from shoal.mesh.api.keys import ROUTE_HEADER
from shoal.mesh.api.openai_routes import read_json
from shoal.mesh.api.openai_schema import CompletionRequest, parse_completion_request
from shoal.mesh.api.records import RequestRecord
from shoal.mesh.api.sse import open_sse
from shoal.models.generate import TokenEvent

REFUSED = ("tools", "previous_response_id", "conversation", "reasoning", "prompt")
RENAMED = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format",
           "response_format.json_schema.schema": "text.format.schema",
           "response_format.type": "text.format.type"}


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"'{param}' must be a string or a list of input_text parts", param, "invalid_type")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
            raise invalid("only input_text parts are supported by shoal", f"{param}[{j}]",
                          "unsupported_value")
        if not isinstance(part.get("text"), str):
            raise invalid(f"'{param}[{j}].text' must be a string", f"{param}[{j}].text", "invalid_type")
        parts.append(part["text"])
    return "".join(parts)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    value = body.get("input")
    out = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid("'instructions' must be a string", "instructions", "invalid_type")
        out.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        return [*out, {"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("'input' must be a string or a non-empty list of messages", "input", "invalid_type")
    for i, item in enumerate(value):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise invalid("only message items are supported by shoal", f"input[{i}]", "unsupported_value")
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise invalid(f"'input[{i}].role' must be user, assistant, system or developer",
                          f"input[{i}].role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(item.get("content"), f"input[{i}].content")})
    return out


def _renamed(exc: ApiError) -> ApiError:
    param = RENAMED.get(exc.param or "", exc.param)
    message = exc.message.replace(f"'{exc.param}'", f"'{param}'")
    return ApiError(exc.status, message, param=param, code=exc.code, type=exc.type)


def _format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("'text' must be an object {format}", "text", "invalid_type")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "json_schema"):
        return None if fmt is None else {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "output"), "schema": fmt.get("schema")}}
    return fmt


def parse_responses(body: Any) -> tuple[CompletionRequest, dict[str, Any]]:
    """A `/v1/responses` body as the shared `CompletionRequest` (and the chat body it was read as)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    for name in REFUSED:
        if body.get(name) not in (None, [], {}):
            raise invalid(f"'{name}' is not supported on /v1/responses by shoal yet", name,
                          "unsupported_parameter")
    if body.get("input") is None:
        raise invalid("'input' is required", "input", "missing_required_parameter")
    chat = {"model": body.get("model"), "messages": _messages(body),
            "max_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature"),
            "top_p": body.get("top_p"), "stream": body.get("stream"),
            "response_format": _format(body.get("text"))}
    try:
        return parse_completion_request(chat, "chat", 1 << 20), chat
    except ApiError as exc:
        raise _renamed(exc) from None


class _Response:
    """The response object at each stage of one request."""

    def __init__(self, record: RequestRecord, model: str, body: dict[str, Any]) -> None:
        self.id = "resp_" + record.id.split("-", 1)[-1]
        self.item_id = "msg_" + secrets.token_hex(12)
        self.record = record
        self.model = model
        self.body = body

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status else []}

    def object(self, done: Collected | None) -> dict[str, Any]:
        incomplete = done is not None and done.finish == "length"
        status = "in_progress" if done is None else ("incomplete" if incomplete else "completed")
        usage = None
        if done is not None:
            usage = {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens,
                     "total_tokens": done.prompt_tokens + done.completion_tokens,
                     "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens_details": {"reasoning_tokens": 0}}
        return {
            "id": self.id, "object": "response", "created_at": int(self.record.started), "status": status,
            "model": self.model, "output": [] if done is None else [self.message(done.text)],
            "usage": usage, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": self.body.get("instructions"),
            "max_output_tokens": self.body.get("max_output_tokens"),
            "temperature": self.body.get("temperature"), "top_p": self.body.get("top_p"),
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
            "text": self.body.get("text") or {"format": {"type": "text"}},
        }


class _EventFramer:
    """The Responses API's typed SSE events around one output_text part."""

    def __init__(self, answer: _Response) -> None:
        self.answer = answer
        self.response: web.StreamResponse | None = None
        self._seq = 0
        self._text: list[str] = []

    async def _event(self, kind: str, **payload: Any) -> None:
        assert self.response is not None
        data = {"type": kind, "sequence_number": self._seq, **payload}
        self._seq += 1
        await self.response.write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.answer.item_id, "output_index": 0, "content_index": 0}

    async def open(self, request: web.Request) -> None:
        self.response = (await open_sse(request, {ROUTE_HEADER: self.answer.record.route.kind})).response
        await self._event("response.created", response=self.answer.object(None))
        await self._event("response.in_progress", response=self.answer.object(None))
        await self._event("response.output_item.added", output_index=0,
                          item={**self.answer.message("", "in_progress"), "content": []})
        await self._event("response.content_part.added", **self._at(),
                          part={"type": "output_text", "text": "", "annotations": []})

    async def token(self, event: TokenEvent) -> None:
        if event.text:
            self._text.append(event.text)
            await self._event("response.output_text.delta", **self._at(), delta=event.text, logprobs=[])

    async def finish(self, done: Collected) -> None:
        done.text = "".join(self._text)
        await self._event("response.output_text.done", **self._at(), text=done.text, logprobs=[])
        await self._event("response.content_part.done", **self._at(),
                          part={"type": "output_text", "text": done.text, "annotations": []})
        await self._event("response.output_item.done", output_index=0, item=self.answer.message(done.text))
        # `response.completed` even when cut short (its status says `incomplete`): the `openai` client's
        # stream helper waits for exactly this event
        await self._event("response.completed", response=self.answer.object(done))
        assert self.response is not None
        await self.response.write_eof()

    async def error(self, error: dict[str, Any]) -> None:
        if self.response is not None:
            await self._event("error", code=error.get("code"), message=error.get("message"),
                              param=error.get("param"))
            await self.response.write_eof()


async def responses(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req, chat = parse_responses(body)
    try:
        served, prompt_ids, params = await prepare(request, req, chat)
    except ApiError as exc:
        raise _renamed(exc) from None
    async with tracked(request, served, prompt_ids, "resp") as run:
        answer = _Response(run.record, served.name, body)
        if req.stream:
            response, run.status = await stream_frames(request, req, served, prompt_ids, params, run.record,
                                                       _EventFramer(answer))
            return response
        done = await collect(request, req, served, prompt_ids, params, run.record)
        if isinstance(done, web.Response):
            run.status = "refused"
            return done
        run.status = done.finish
        return json_response(answer.object(done), headers={ROUTE_HEADER: run.record.route.kind})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)
