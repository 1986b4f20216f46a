"""Anthropic's Messages API, `POST /v1/messages`, which some agents speak, over shoal's models.

The body (`model`, `max_tokens`, `messages` of text blocks, `system`, `stop_sequences`, `temperature`,
`top_p`, `top_k`, `stream`) is rewritten into the OpenAI shape and checked by
`openai_schema.parse_completion_request`; an error names the Anthropic field. Features shoal lacks
(enabled `thinking`, image/document blocks, server tools, a final assistant message to continue) are 400s
naming the field; `output_config.format` (a JSON Schema) constrains the answer; custom `tools` with
`tool_choice` auto/any/tool/none run through `mesh.api.structured` (a `tool_use` block, `stop_reason:
"tool_use"`; streamed as `input_json_delta`s), and `tool_use`/`tool_result` blocks continue a conversation.
Streaming sends Anthropic's named SSE events:
`message_start`, `content_block_start`, `ping`, `content_block_delta` (text), `content_block_stop`,
`message_delta` (stop reason, output tokens), `message_stop`; an error once streaming is an `error` event.
It runs through `mesh.api.generation`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import web
from shoal.mesh.api.errors import ApiError, invalid, json_response
from shoal.mesh.api.generation import Collected, collect, prepare, stream_frames, tracked
from shoal.mesh.api.keys import ROUTE_HEADER
from shoal.mesh.api.openai_routes import read_json
from shoal.mesh.api.openai_schema import CompletionRequest, parse_completion_request
from shoal.mesh.api.progress import comment_text
from shoal.mesh.api.records import RequestRecord
from shoal.mesh.api.sse import open_sse
from shoal.mesh.api.structured import ToolCallStream, parse_call
from shoal.models.generate import TokenEvent

REFUSED = ("mcp_servers", "container")
RENAMED = {"stop": "stop_sequences", "response_format": "output_config.format",
           "response_format.json_schema.schema": "output_config.format.schema",
           "tool_choice.function.name": "tool_choice.name"}
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


def _tool_blocks(content: Any, role: str, param: str) -> list[dict[str, Any]] | None:
    """A message with `tool_use` (assistant) or `tool_result` (user) blocks as OpenAI-shaped messages; None
    when it has none."""
    if not isinstance(content, list) or not any(
            isinstance(b, dict) and b.get("type") in ("tool_use", "tool_result") for b in content):
        return None
    text = _text([b for b in content if isinstance(b, dict) and b.get("type") == "text"], param)
    out: list[dict[str, Any]] = []
    calls = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise invalid(f"'{param}[{j}]' must be {{type: tool_use, id, name, input}}", f"{param}[{j}]",
                              "invalid_type")
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result" and role == "user":
            result = block.get("content", "")
            out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                        "content": _text(result, f"{param}[{j}].content") if result else ""})
        elif kind != "text":
            raise invalid(f"content block type {kind!r} is not supported here by shoal", f"{param}[{j}].type",
                          "unsupported_value")
    if role == "assistant":
        return [{"role": "assistant", "content": text or None, "tool_calls": calls}]
    return out + ([{"role": "user", "content": text}] if text else [])


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    """Anthropic `tools` / `tool_choice` in OpenAI's shape (`mesh.api.structured` enforces them)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools in (None, []):
        return {}
    if not isinstance(tools, list):
        raise invalid("'tools' must be a list of {name, description, input_schema}", "tools", "invalid_type")
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            raise invalid("only custom tools {name, description, input_schema} are supported by shoal",
                          f"tools[{i}]", "unsupported_value")
        functions.append({"type": "function", "function": {
            "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("input_schema", {"type": "object"})}})
    kind = choice.get("type") if isinstance(choice, dict) else None
    if choice is not None and kind not in ("auto", "any", "tool", "none"):
        raise invalid("'tool_choice' must be {type: auto|any|tool|none}", "tool_choice", "invalid_type")
    mapped: Any = {"auto": "auto", "any": "required", "none": "none", None: "auto"}.get(kind)
    if kind == "tool":
        mapped = {"type": "function", "function": {"name": choice.get("name")}}
    return {"tools": functions, "tool_choice": mapped}


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
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
        blocks = _tool_blocks(message.get("content"), role, f"messages[{i}].content")
        if blocks is not None:
            out.extend(blocks)
            continue
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
    translated.update(_tools(body))
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


def _message(record: RequestRecord, model: str, text: str | None, done: Collected | None,
             tools: bool = False) -> dict[str, Any]:
    reason, sequence = _stop_reason(done) if done is not None else (None, None)
    content: list[dict[str, Any]] = [] if text is None else [{"type": "text", "text": text}]
    call = parse_call(text) if tools and text is not None and reason == "end_turn" else None
    if call is not None:
        fn = call["function"]
        content = [{"type": "tool_use", "id": "toolu_" + call["id"][5:], "name": fn["name"],
                    "input": json.loads(fn["arguments"])}]
        reason = "tool_use"
    return {
        "id": "msg_" + record.id.split("-", 1)[-1], "type": "message", "role": "assistant", "model": model,
        "content": content,
        "stop_reason": reason, "stop_sequence": sequence,
        "usage": {"input_tokens": record.prompt_tokens,
                  "output_tokens": done.completion_tokens if done is not None else 0},
    }


class _EventFramer:
    """Anthropic's named SSE events around one content block: `text`, or with tools a `tool_use` block whose
    input streams as `input_json_delta`s (`structured.ToolCallStream` tells which)."""

    def __init__(self, record: RequestRecord, model: str, tools: bool = False) -> None:
        self.record = record
        self.model = model
        self.response: web.StreamResponse | None = None
        self._calls = ToolCallStream() if tools else None
        self._block: str | None = None

    async def _start(self, block: dict[str, Any]) -> None:
        self._block = block["type"]
        await self._event("content_block_start", {"type": "content_block_start", "index": 0,
                                                  "content_block": block})

    async def _delta(self, delta: dict[str, Any]) -> None:
        if "content" in delta:
            if self._block is None:
                await self._start({"type": "text", "text": ""})
            text = {"type": "text_delta", "text": delta["content"]}
            await self._event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                      "delta": text})
            return
        call = delta["tool_calls"][0]
        fn = call.get("function", {})
        if "name" in fn:
            await self._start({"type": "tool_use", "id": "toolu_" + call["id"][5:], "name": fn["name"],
                               "input": {}})
        if fn.get("arguments"):
            await self._event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": fn["arguments"]}})

    async def _event(self, name: str, payload: dict[str, Any]) -> None:
        assert self.response is not None
        await self.response.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n")

    async def open(self, request: web.Request) -> None:
        self.response = (await open_sse(request, {ROUTE_HEADER: self.record.route.kind})).response
        await self._event("message_start", {"type": "message_start",
                                            "message": _message(self.record, self.model, None, None)})
        await self._event("ping", {"type": "ping"})

    async def progress(self, report: dict[str, Any]) -> None:
        """An SSE comment (`: shoal progress {...}`), which the official client skips."""
        assert self.response is not None
        await self.response.write(b": " + comment_text(report).encode() + b"\n\n")

    async def token(self, event: TokenEvent) -> None:
        if not event.text:
            return
        for delta in self._calls.push(event.text) if self._calls is not None else [{"content": event.text}]:
            await self._delta(delta)

    async def finish(self, done: Collected) -> None:
        reason, sequence = _stop_reason(done)
        for delta in self._calls.finish() if self._calls is not None else []:
            await self._delta(delta)
        if self._block is None:
            await self._start({"type": "text", "text": ""})
        if self._block == "tool_use" and reason == "end_turn":
            reason = "tool_use"
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
            framer = _EventFramer(run.record, served.name, req.tools is not None)
            response, run.status = await stream_frames(request, req, served, prompt_ids, params, run.record,
                                                       framer)
            return response
        done = await collect(request, req, served, prompt_ids, params, run.record)
        if isinstance(done, web.Response):
            run.status = "refused"
            return done
        run.status = done.finish
        return json_response(_message(run.record, served.name, done.text, done, req.tools is not None),
                             headers={ROUTE_HEADER: run.record.route.kind})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
