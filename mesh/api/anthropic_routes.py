"""Anthropic's Messages API, `POST /v1/messages`, which some agents speak, over shoal's models.

The body (`model`, `max_tokens`, `messages` of text blocks, `system`, `stop_sequences`, `temperature`,
`top_p`, `top_k`, `stream`) is rewritten into the OpenAI shape and checked by
`openai_schema.parse_completion_request`; an error names the Anthropic field. Features shoal lacks
(`tools`, `tool_choice`, enabled `thinking`, image/document/tool blocks, a final assistant message to
continue) are 400s naming the field; `output_config.format` (a JSON Schema) constrains the answer.
Streaming sends Anthropic's named SSE events:
`message_start`, `content_block_start`, `ping`, `content_block_delta` (text), `content_block_stop`,
`message_delta` (stop reason, output tokens), `message_stop`; an error once streaming is an `error` event.
It runs through `mesh.api.generation`.
"""

from __future__ import annotations

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

REFUSED = ("tools", "tool_choice", "mcp_servers", "container")
RENAMED = {"stop": "stop_sequences", "response_format": "output_config.format",
           "response_format.json_schema.schema": "output_config.format.schema"}
"""OpenAI field -> Anthropic field, for error messages."""


def _text(content: Any, param: str) -> str:
    """A message's (or the system prompt's) text: a string, or a list of `text` blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"'{param}' must be a string or a list of content blocks", param, "invalid_type")
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(f"'{param}[{j}]' must be a content block with a 'type'", f"{param}[{j}]",
                          "invalid_type")
        if block["type"] != "text":
            raise invalid(f"content block type {block['type']!r} is not supported by shoal (text only)",
                          f"{param}[{j}].type", "unsupported_value")
        if not isinstance(block.get("text"), str):
            raise invalid(f"'{param}[{j}].text' must be a string", f"{param}[{j}].text", "invalid_type")
        parts.append(block["text"])
    return "".join(parts)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of messages", "messages", "invalid_type")
    out = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text(system, "system")})
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise invalid(f"'messages[{i}].role' must be 'user' or 'assistant', got {role!r}",
                          f"messages[{i}].role")
        out.append({"role": role, "content": _text(message.get("content"), f"messages[{i}].content")})
    if out[-1]["role"] == "assistant":
        raise invalid("continuing a final assistant message (prefill) is not supported by shoal",
                      f"messages[{len(messages) - 1}].role", "unsupported_value")
    return out


def _output_format(config: Any) -> dict[str, Any] | None:
    """`output_config.format` (`{"type": "json_schema", "schema"}`) as OpenAI's `response_format`; `effort`
    is accepted and has no effect."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise invalid("'output_config' must be an object", "output_config", "invalid_type")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise invalid("'output_config.format' must be {type: json_schema, schema}", "output_config.format",
                      "unsupported_value")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.get("schema")}}


def parse_messages(body: Any) -> tuple[CompletionRequest, dict[str, Any]]:
    """A `/v1/messages` body as the shared `CompletionRequest` (and the OpenAI-shaped body it was read as)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    for name in REFUSED:
        if body.get(name) not in (None, [], {}):
            raise invalid(f"'{name}' is not supported by shoal; leave it out", name, "unsupported_parameter")
    thinking = body.get("thinking")
    if thinking is not None and (not isinstance(thinking, dict) or thinking.get("type") != "disabled"):
        raise invalid("'thinking' is not supported by shoal (no thinking models)", "thinking",
                      "unsupported_value")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required", "model", "missing_required_parameter")
    if body.get("max_tokens") is None:
        raise invalid("'max_tokens' is required", "max_tokens", "missing_required_parameter")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean", "stream", "invalid_type")
    translated: dict[str, Any] = {"model": model, "messages": _messages(body),
                                  "max_tokens": body["max_tokens"]}
    for name in ("temperature", "top_p", "top_k"):
        translated[name] = body.get(name)
    stops = body.get("stop_sequences")
    if stops is not None and not isinstance(stops, list):
        raise invalid("'stop_sequences' must be a list of strings", "stop_sequences", "invalid_type")
    translated["stop"] = stops
    translated["response_format"] = _output_format(body.get("output_config"))
    translated["stream"] = bool(stream)
    try:
        return parse_completion_request(translated, "chat", 1 << 20), translated
    except ApiError as exc:
        raise _renamed(exc) from None


def _renamed(exc: ApiError) -> ApiError:
    """`exc` naming the Anthropic field instead of the OpenAI one."""
    param = RENAMED.get(exc.param or "", exc.param)
    message = exc.message.replace(f"'{exc.param}'", f"'{param}'")
    return ApiError(exc.status, message, param=param, code=exc.code, type=exc.type)


def _stop_reason(done: Collected) -> tuple[str, str | None]:
    if done.finish == "length":
        return "max_tokens", None
    if done.stop_sequence is not None:
        return "stop_sequence", done.stop_sequence
    return "end_turn", None


def _message(record: RequestRecord, model: str, text: str | None, done: Collected | None) -> dict[str, Any]:
    reason, sequence = _stop_reason(done) if done is not None else (None, None)
    return {
        "id": "msg_" + record.id.split("-", 1)[-1], "type": "message", "role": "assistant", "model": model,
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": reason, "stop_sequence": sequence,
        "usage": {"input_tokens": record.prompt_tokens,
                  "output_tokens": done.completion_tokens if done is not None else 0},
    }


class _EventFramer:
    """Anthropic's named SSE events around one text block."""

    def __init__(self, record: RequestRecord, model: str) -> None:
        self.record = record
        self.model = model
        self.response: web.StreamResponse | None = None

    async def _event(self, name: str, payload: dict[str, Any]) -> None:
        assert self.response is not None
        await self.response.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n")

    async def open(self, request: web.Request) -> None:
        self.response = (await open_sse(request, {ROUTE_HEADER: self.record.route.kind})).response
        await self._event("message_start", {"type": "message_start",
                                            "message": _message(self.record, self.model, None, None)})
        await self._event("content_block_start", {"type": "content_block_start", "index": 0,
                                                  "content_block": {"type": "text", "text": ""}})
        await self._event("ping", {"type": "ping"})

    async def token(self, event: TokenEvent) -> None:
        if event.text:
            await self._event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                      "delta": {"type": "text_delta", "text": event.text}})

    async def finish(self, done: Collected) -> None:
        reason, sequence = _stop_reason(done)
        await self._event("content_block_stop", {"type": "content_block_stop", "index": 0})
        await self._event("message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                            "usage": {"output_tokens": done.completion_tokens}})
        await self._event("message_stop", {"type": "message_stop"})
        assert self.response is not None
        await self.response.write_eof()

    async def error(self, error: dict[str, Any]) -> None:
        if self.response is not None:
            await self._event("error", {"type": "error", "error": error})
            await self.response.write_eof()


async def messages(request: web.Request) -> web.StreamResponse:
    req, body = parse_messages(await read_json(request))
    try:
        served, prompt_ids, params = await prepare(request, req, body)
    except ApiError as exc:
        raise _renamed(exc) from None
    async with tracked(request, served, prompt_ids, "msg") as run:
        if body["stream"]:
            framer = _EventFramer(run.record, served.name)
            response, run.status = await stream_frames(request, req, served, prompt_ids, params, run.record,
                                                       framer)
            return response
        done = await collect(request, req, served, prompt_ids, params, run.record)
        if isinstance(done, web.Response):
            run.status = "refused"
            return done
        run.status = done.finish
        return json_response(_message(run.record, served.name, done.text, done),
                             headers={ROUTE_HEADER: run.record.route.kind})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
