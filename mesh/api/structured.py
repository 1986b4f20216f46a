"""Structured output and tool calls for the OpenAI routes, on top of grammar-constrained decoding
(`models.grammar`).

`response_format` `json_object` / `json_schema` becomes a `Constraint`. `tools` with `tool_choice`
`required` (or a named function) constrain the answer to `{"name": <a tool>, "arguments": <its parameters>}`;
`auto` (the default when tools are given) lets the model either answer in text or make such a call (a Lark
grammar: text that does not start with `{`, or the call); `none` ignores the tools. The tools are described to
the model in a system message. An answer that is a call comes back as `tool_calls` with `finish_reason:
"tool_calls"`; `ToolCallStream` turns the streamed text into OpenAI's `tool_calls` deltas (the name once it is
complete, then the arguments as they are generated).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from shoal.mesh.api.errors import invalid
from shoal.models.grammar import JSON_OPTIONS, MAX_GRAMMAR_CHARS, Constraint

MAX_TOOLS = 64
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CALL_HEAD = re.compile(r'^\s*\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


def response_constraint(value: Any) -> Constraint | None:
    """`response_format` as a `Constraint` (None for `text`); 400 naming the bad field."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("'response_format' must be an object with a 'type'", "response_format", "invalid_type")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind != "json_schema":
        raise invalid(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                      "response_format.type", "unsupported_value")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("'response_format.json_schema' must be an object {name, schema, strict}",
                      "response_format.json_schema", "invalid_type")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise invalid("'response_format.json_schema.schema' must be a JSON Schema object",
                      "response_format.json_schema.schema", "invalid_type")
    return _constraint(schema, "response_format.json_schema.schema")


def _constraint(schema: dict[str, Any], param: str) -> Constraint:
    try:
        return Constraint.json_schema(schema)
    except ValueError as exc:
        raise invalid(str(exc), param) from None


@dataclass(frozen=True)
class ToolSpec:
    """A request's tools and how the model may use them."""

    tools: list[dict[str, Any]]
    """`{"name", "description", "parameters"}` per function."""
    choice: Literal["auto", "required"] | str
    """`auto`, `required`, or the name of the function that must be called."""
    constraint: Constraint = field(repr=False, default=Constraint("json_object"))

    def system_text(self) -> str:
        """What the model is told about the tools (a system message)."""
        lines = ["You can call these functions:"]
        for tool in self.tools:
            lines.append(json.dumps(tool, sort_keys=True))
        ask = "You must call one of them." if self.choice != "auto" else "Call one only if it helps."
        lines.append(f'{ask} To call one, answer with only {{"name": <function name>, "arguments": '
                     "<an object matching its parameters>}.")
        return "\n".join(lines)


def _tool(value: Any, i: int) -> dict[str, Any]:
    param = f"tools[{i}]"
    if not isinstance(value, dict) or value.get("type") != "function" or \
            not isinstance(value.get("function"), dict):
        raise invalid(f"'{param}' must be {{type: function, function: {{name, parameters}}}}", param,
                      "invalid_type")
    fn = value["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise invalid(f"'{param}.function.name' must be 1-64 letters, digits, _ or -",
                      f"{param}.function.name")
    parameters = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise invalid(f"'{param}.function.parameters' must be a JSON Schema object",
                      f"{param}.function.parameters", "invalid_type")
    description = fn.get("description")
    return {"name": name, "description": description if isinstance(description, str) else "",
            "parameters": parameters}


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    properties = {"name": {"const": tool["name"]}, "arguments": tool["parameters"]}
    return {"type": "object", "properties": properties, "required": ["name", "arguments"],
            "additionalProperties": False}


def tool_spec(body: dict[str, Any]) -> ToolSpec | None:
    """`tools` and `tool_choice` of a chat request (None: no tools, or `tool_choice: "none"`)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise invalid("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise invalid(f"'tools' must be a list of at most {MAX_TOOLS} functions", "tools", "invalid_type")
    parsed = [_tool(t, i) for i, t in enumerate(tools)]
    names = [t["name"] for t in parsed]
    if len(set(names)) != len(names):
        raise invalid("function names in 'tools' must be unique", "tools")
    if choice in (None, "auto"):
        choice = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        pass
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        choice = choice["function"].get("name")
        if choice not in names:
            raise invalid(f"'tool_choice.function.name' must name one of the tools: {', '.join(names)}",
                          "tool_choice.function.name")
    else:
        raise invalid("'tool_choice' must be none, auto, required or {type: function, function: {name}}",
                      "tool_choice", "invalid_type")
    allowed = [t for t in parsed if choice in ("auto", "required") or t["name"] == choice]
    schemas = [_call_schema(t) for t in allowed]
    call = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if choice == "auto":
        call = {**call, "x-guidance": JSON_OPTIONS}
        lark = f"start: call | text\ncall: %json {json.dumps(call)}\ntext: /[^{{ \\t\\n][\\s\\S]*/\n"
        if len(lark) > MAX_GRAMMAR_CHARS:
            raise invalid("'tools' are too large to enforce", "tools")
        constraint = Constraint("lark", lark)
    else:
        constraint = _constraint(call, "tools")
    return ToolSpec(parsed, choice, constraint)


def parse_call(text: str) -> dict[str, Any] | None:
    """The OpenAI `tool_calls` entry an answer makes, or None if it is plain text."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None  # cut short (max_tokens): leave it as text
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or "arguments" not in data:
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(data["arguments"])}}


class ToolCallStream:
    """Streamed answer text -> OpenAI chat deltas. Until the answer's first character is known it holds the
    text; plain text then flows as `content`; a call flows as `tool_calls` deltas: `{index, id, type,
    function: {name, arguments: ""}}` once the name is complete, then `{index, function: {arguments}}` pieces
    (the closing brace of the call is held back until the end)."""

    def __init__(self) -> None:
        self.text = ""
        self.mode: Literal["unknown", "text", "call"] = "unknown"
        self._args_at = 0
        self._sent = 0
        self.call_id = "call_" + secrets.token_hex(12)

    def push(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        if self.mode == "unknown":
            stripped = self.text.lstrip()
            if not stripped:
                return []
            self.mode = "call" if stripped.startswith("{") else "text"
            if self.mode == "text":
                return [{"content": self.text}]
        if self.mode == "text":
            return [{"content": piece}] if piece else []
        return self._call_deltas(final=False)

    def finish(self) -> list[dict[str, Any]]:
        if self.mode == "unknown":
            return [{"content": self.text}] if self.text else []
        if self.mode == "text":
            return []
        if not self._args_at and CALL_HEAD.match(self.text) is None:  # cut short before the name: as text
            self.mode = "text"
            return [{"content": self.text}]
        return self._call_deltas(final=True)

    @property
    def is_call(self) -> bool:
        return self.mode == "call" and self._args_at > 0

    def _call_deltas(self, final: bool) -> list[dict[str, Any]]:
        out = []
        if not self._args_at:
            head = CALL_HEAD.match(self.text)
            if head is None:
                return []
            self._args_at = head.end()
            out.append({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                        "function": {"name": json.loads(head.group(1)), "arguments": ""}}]})
        args = self.text[self._args_at:]
        if final:
            end = len(args.rstrip()) - 1 if args.rstrip().endswith("}") else len(args)
        else:
            end = len(args) - 1
        if end > self._sent:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": args[self._sent:end]}}]})
            self._sent = end
        return out
