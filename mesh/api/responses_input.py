"""A `/v1/responses` body read as the chat request it stands for.

`input` (a string, or items: `message`s whose content is a string or `input_text`/`output_text` parts,
`function_call`s the model made earlier and the `function_call_output`s that answer them), `instructions` (a
system message), `previous_response_id` (the stored conversation goes first), `tools` (function tools in
the Responses shape `{type: "function", name, description, parameters, strict}`), `tool_choice` (`auto`,
`none`, `required`, `{type: "function", name}`), `parallel_tool_calls`, `max_output_tokens`, `temperature`,
`top_p`, `text.format` (`text`, `json_object`, `json_schema`) and `stream` become a chat body, which the
chat path validates (`openai_schema.parse_completion_request`, with its tool machinery in `structured`).
Its errors name the Responses fields (`max_output_tokens`, `tools[0].name`, ...). Refused with a 400 naming
the field: `conversation`, `reasoning`, `prompt`, non-function tools, non-text input parts, other item types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shoal.mesh.api.errors import ApiError, invalid
from shoal.mesh.api.openai_schema import CompletionRequest, parse_completion_request
from shoal.mesh.api.responses_store import ResponseStore

REFUSED = ("conversation", "reasoning", "prompt")
RENAMED = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format",
           "response_format.json_schema.schema": "text.format.schema",
           "response_format.type": "text.format.type", "tool_choice.function.name": "tool_choice.name"}
TOOL_FIELD = re.compile(r"^tools\[(\d+)\]\.function\.")
MAX_ID = 256


@dataclass(frozen=True)
class ResponsesRequest:
    """A parsed `/v1/responses` body."""

    req: CompletionRequest
    chat: dict[str, Any]
    """The chat body it was read as (what `generation.prepare` reads field names from)."""
    conversation: list[dict[str, Any]]
    """The chat messages before the answer, without the instructions: what the store keeps."""
    tools: list[dict[str, Any]]
    """The request's tools in the Responses shape (echoed in the response object)."""
    store: bool


def renamed(exc: ApiError) -> ApiError:
    """A chat-path error with the Responses API's field name."""
    param = RENAMED.get(exc.param or "", exc.param)
    if param is not None:
        param = TOOL_FIELD.sub(r"tools[\1].", param)
    message = exc.message.replace(f"'{exc.param}'", f"'{param}'")
    return ApiError(exc.status, message, param=param, code=exc.code, type=exc.type)


def _text(content: Any, param: str) -> str:
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


def _string(item: dict[str, Any], key: str, param: str, limit: int | None = MAX_ID) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value or (limit is not None and len(value) > limit):
        size = f" of at most {limit} characters" if limit is not None else ""
        raise invalid(f"'{param}.{key}' must be a non-empty string{size}", f"{param}.{key}", "invalid_type")
    return value


def _items(value: Any) -> list[dict[str, Any]]:
    """`input` as chat messages; consecutive `function_call` items become one assistant message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("'input' must be a string or a non-empty list of items", "input", "invalid_type")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"'{param}' must be an object", param, "invalid_type")
        kind = item.get("type", "message")
        if kind == "function_call":
            call = {"id": _string(item, "call_id", param), "type": "function",
                    "function": {"name": _string(item, "name", param, 64),
                                 "arguments": _string(item, "arguments", param, None)}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", param),
                        "content": _text(item.get("output"), f"{param}.output")})
        elif kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"'{param}.role' must be user, assistant, system or developer", f"{param}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text(item.get("content"), f"{param}.content")})
        else:
            raise invalid("input items must be message, function_call or function_call_output",
                          f"{param}.type", "unsupported_value")
    return out


def _tools(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the tools as given, the same as chat tools)."""
    if value is None or value == []:
        return [], []
    if not isinstance(value, list):
        raise invalid("'tools' must be a list of function tools", "tools", "invalid_type")
    given, chat = [], []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise invalid(f"'tools[{i}]' must be an object", f"tools[{i}]", "invalid_type")
        if tool.get("type") != "function":
            raise invalid(f"tool type {str(tool.get('type'))[:40]!r} is not supported by shoal (function "
                          "only)", f"tools[{i}].type", "unsupported_value")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        given.append({"type": "function", "name": tool.get("name"), "description": tool.get("description"),
                      "parameters": tool.get("parameters"), "strict": tool.get("strict", True)})
        chat.append({"type": "function", "function": function})
    return given, chat


def _tool_choice(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value  # auto, none, required; anything else the chat path refuses
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    raise invalid("'tool_choice' must be none, auto, required or {type: function, name}", "tool_choice",
                  "invalid_type")


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


def parse_responses(body: Any, store: ResponseStore, route_header: str | None = None) -> ResponsesRequest:
    """A `/v1/responses` body as the shared `CompletionRequest`; 400 naming the bad field, and
    `previous_response_not_found` for an id this node does not keep."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    for name in REFUSED:
        if body.get(name) not in (None, [], {}):
            raise invalid(f"'{name}' is not supported on /v1/responses by shoal yet", name,
                          "unsupported_parameter")
    if body.get("input") is None:
        raise invalid("'input' is required", "input", "missing_required_parameter")
    keep = body.get("store", True)
    if not isinstance(keep, bool):
        raise invalid("'store' must be a boolean", "store", "invalid_type")
    previous: list[dict[str, Any]] = []
    previous_id = body.get("previous_response_id")
    if previous_id is not None:
        found = store.get(previous_id) if isinstance(previous_id, str) else None
        if found is None:
            raise invalid(f"no response {str(previous_id)[:80]!r} is kept on this node (unknown, expired, or "
                          "made with store: false)", "previous_response_id", "previous_response_not_found")
        previous = found.conversation
    conversation = [*previous, *_items(body["input"])]
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("'instructions' must be a string", "instructions", "invalid_type")
    system = [] if instructions is None else [{"role": "system", "content": instructions}]
    tools, chat_tools = _tools(body.get("tools"))
    chat = {"model": body.get("model"), "messages": [*system, *conversation],
            "max_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature"),
            "top_p": body.get("top_p"), "stream": body.get("stream"),
            "response_format": _format(body.get("text")),
            "tools": chat_tools or None, "tool_choice": _tool_choice(body.get("tool_choice")),
            "parallel_tool_calls": body.get("parallel_tool_calls"), "shoal": body.get("shoal")}
    try:
        req = parse_completion_request(chat, "chat", 1 << 20, route_header)
    except ApiError as exc:
        raise renamed(exc) from None
    return ResponsesRequest(req, chat, conversation, tools, keep)
