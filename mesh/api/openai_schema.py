"""Validate OpenAI `chat/completions` and `completions` request bodies into a `CompletionRequest`.

Rules: every known parameter is type-checked (`bool` is not a number); `null` means "not given"; parameters
that would change the meaning of the answer but that shoal does not implement (`n > 1`, `tools`,
`response_format` other than text, `logit_bias`, `echo`, `best_of > 1`, `suffix`, `web_search_options`, …)
are refused with a 400 naming the parameter; anything else unknown (`user`, `metadata`, `store`, …) is
accepted and ignored. `logprobs` (chat: a boolean plus `top_logprobs`; completions: the number of top
tokens) becomes `SamplingParams.logprobs`; sampling fields a request leaves out come from the model
(`sampling_defaults`).
shoal's own routing wishes come in an optional `shoal` object (`{"route", "prefer", "avoid"}`, what the
`openai` client sends as `extra_body={"shoal": {...}}`) or the `x-shoal-route` header (`route_choice`); its
`keep_alive` (Ollama's durations, `mesh.api.keep_alive`) sets how long the model stays loaded afterwards.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from shoal.mesh.api.errors import invalid
from shoal.mesh.api.keep_alive import parse_keep_alive
from shoal.mesh.api.structured import ToolSpec, response_constraint, tool_spec
from shoal.mesh.route import MAX_ROUTE_PEERS, ROUTE_MODES, RouteChoice

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 4096
ROLES = ("system", "developer", "user", "assistant")

# Accepted with a default-equivalent value only; any other value would change semantics.
_ONLY_DEFAULT: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "parallel_tool_calls": (True, False),
    "modalities": (["text"],),
    "prediction": (),
    "audio": (),
    "function_call": ("none",),
    "web_search_options": (),
}
_EMPTY_OK = ("functions", "logit_bias")
MAX_LOGPROBS = 20


def _logprobs(body: dict[str, Any], kind: Literal["chat", "text"]) -> int | None:
    """How many top tokens to report with each token's logprob; None: no logprobs. Chat takes `logprobs`
    (boolean) and `top_logprobs` (0-20, only with `logprobs`); completions take `logprobs` (0-20)."""
    if kind == "text":
        return _integer(body, "logprobs", 0, MAX_LOGPROBS)
    wanted = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not wanted:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request. `messages` is set for chat, `prompt` (text or token ids) for completions."""

    kind: Literal["chat", "text"]
    model: str | None
    stream: bool
    include_usage: bool
    max_tokens: int | None
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `models.sampling.SamplingParams` (without `max_tokens`)."""
    route: RouteChoice = field(default_factory=RouteChoice)
    """Where the request may run (the `shoal` body field, else the `x-shoal-route` header)."""
    tools: ToolSpec | None = None
    """The functions the model may call (chat), when given and `tool_choice` is not `none`."""
    keep_alive: float | None = None
    """`shoal.keep_alive`: seconds the model stays loaded after this request (negative: forever; None: the
    node's default)."""


ROUTE_HEADER_IN = "x-shoal-route"


def route_choice(value: Any, header: str | None) -> RouteChoice:
    """The request's routing wishes: the body's `shoal` object (`route`, `prefer`, `avoid`) and, where the
    body names no route, the `x-shoal-route` header. Raises a 400 naming the bad field."""
    mode = None
    if header is not None:
        mode = header.strip().lower()
        if mode not in ROUTE_MODES:
            raise invalid(f"header x-shoal-route must be one of {', '.join(ROUTE_MODES)}", ROUTE_HEADER_IN)
    if value is None:
        return RouteChoice(mode or "auto")
    if not isinstance(value, dict):
        raise invalid("'shoal' must be an object: {route, prefer, avoid}", "shoal", "invalid_type")
    for key in value:
        if key not in ("route", "prefer", "avoid", "keep_alive"):
            raise invalid(f"'shoal.{str(key)[:40]}' is not a shoal option (route, prefer, avoid, keep_alive)",
                          f"shoal.{str(key)[:40]}", "unknown_parameter")
    route = value.get("route")
    if route is not None:
        if route not in ROUTE_MODES:
            raise invalid(f"'shoal.route' must be one of {', '.join(ROUTE_MODES)}", "shoal.route")
        mode = route
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("prefer", "avoid"):
        peers = value.get(key)
        if peers is None:
            lists[key] = ()
            continue
        if not isinstance(peers, list) or len(peers) > MAX_ROUTE_PEERS or not all(
            isinstance(p, str) and 0 < len(p) <= 128 for p in peers
        ):
            raise invalid(f"'shoal.{key}' must be a list of at most {MAX_ROUTE_PEERS} peer ids or names",
                          f"shoal.{key}", "invalid_type")
        lists[key] = tuple(peers)
    return RouteChoice(mode or "auto", lists["prefer"], lists["avoid"])


def _number(
    body: dict[str, Any], name: str, low: float, high: float, *, low_open: bool = False
) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(f"'{name}' must be a number, got {value!r}", name, "invalid_type")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid(f"'{name}' must be in {bracket}{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise invalid(f"'{name}' must be an integer, got {value!r}", name, "invalid_type")
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def _boolean(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise invalid(f"'{name}' must be a boolean, got {value!r}", name, "invalid_type")


def _stop(body: dict[str, Any]) -> list[str] | None:
    value = body.get("stop")
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > MAX_STOP_SEQUENCES:
        raise invalid(f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(items)}", "stop")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in items):
        raise invalid(f"each 'stop' sequence must be 1-{MAX_STOP_LENGTH} characters", "stop")
    return items or None


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = _integer(body, "n", 1, 128)
    if n is not None and n != 1:
        raise invalid("'n' must be 1: shoal returns one choice per request", "n", "unsupported_value")
    for name, allowed in _ONLY_DEFAULT.items():
        value = body.get(name)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise invalid(
                f"'{name}' = {value!r} is not supported by shoal; leave it out", name, "unsupported_parameter"
            )
    for name in _EMPTY_OK:
        value = body.get(name)
        if value is not None and value not in ([], {}):
            raise invalid(f"'{name}' is not supported by shoal; leave it out", name, "unsupported_parameter")


def _message_content(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"'{param}' parts must be objects with a 'type'", param, "invalid_type")
            if part["type"] != "text":
                raise invalid(
                    f"content part type {part['type']!r} is not supported by shoal (text only)",
                    param,
                    "unsupported_value",
                )
            if not isinstance(part.get("text"), str):
                raise invalid(f"'{param}' text parts need a string 'text'", param, "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"'{param}' must be a string or a list of content parts", param, "invalid_type")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise invalid("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise invalid("'messages' must be a list of message objects", "messages", "invalid_type")
    if not messages:
        raise invalid("'messages' must not be empty", "messages", "empty_array")
    if len(messages) > MAX_MESSAGES:
        raise invalid(f"'messages' may hold at most {MAX_MESSAGES} messages", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type")
        role = message.get("role")
        if role == "tool":  # a function's result, told to the model as a user turn
            text = _message_content(message.get("content"), i)
            out.append({"role": "user", "content": f"Function result: {text}"})
            continue
        if role not in ROLES:
            if role == "function":
                raise invalid(
                    "role 'function' is not supported by shoal (use 'tool')",
                    f"messages[{i}].role",
                    "unsupported_value",
                )
            raise invalid(
                f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got {role!r}", f"messages[{i}].role"
            )
        text = _message_content(message.get("content"), i)
        if message.get("tool_calls") and role == "assistant":
            text = (text + "\n" if text else "") + _calls_text(message["tool_calls"], i)
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def _calls_text(calls: Any, index: int) -> str:
    """An assistant message's `tool_calls` as the text the model writes to make them."""
    param = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise invalid(f"'{param}' must be a list", param, "invalid_type")
    parts = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(
                fn.get("arguments", "{}"), str):
            raise invalid(f"'{param}' entries must be {{function: {{name, arguments}}}}", param,
                          "invalid_type")
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise invalid(f"'{param}' arguments must be JSON text", param) from None
        parts.append(json.dumps({"name": fn["name"], "arguments": arguments}))
    return "\n".join(parts)


def _with_tools(messages: list[dict[str, str]], tools: ToolSpec) -> list[dict[str, str]]:
    """`messages` with the tools described in the (first) system message."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + tools.system_text()},
                *messages[1:]]
    return [{"role": "system", "content": tools.system_text()}, *messages]


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        if any(t < 0 for t in prompt):
            raise invalid("token ids in 'prompt' must be non-negative", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise invalid(
            "batched prompts are not supported by shoal: send one prompt", "prompt", "unsupported_value"
        )
    raise invalid("'prompt' must be a string or a list of token ids", "prompt", "invalid_type")


def parse_completion_request(
    body: Any, kind: Literal["chat", "text"], context_length: int, route_header: str | None = None
) -> CompletionRequest:
    """Check `body` (decoded JSON) for endpoint `kind`; raises `ApiError` (400) naming the bad parameter.
    `route_header`: the request's `x-shoal-route` header, if any."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise invalid("'model' must be a non-empty string", "model", "invalid_type")
    _refuse_unsupported(body)
    stream = bool(_boolean(body, "stream"))
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
        include_usage = bool(_boolean(options, "include_usage"))
    max_tokens = _integer(body, "max_tokens", 1, context_length)
    max_completion = _integer(body, "max_completion_tokens", 1, context_length)
    if max_completion is not None:
        max_tokens = max_completion
    sampling: dict[str, Any] = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, low_open=True),
        "top_k": _integer(body, "top_k", 0, 1_000_000),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "seed": _integer(body, "seed", 0, 2**63 - 1),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0),
        "repetition_penalty": _number(body, "repetition_penalty", 0.0, 10.0, low_open=True),
        "stop": _stop(body),
    }
    sampling["logprobs"] = _logprobs(body, kind)
    sampling["constraint"] = response_constraint(body.get("response_format"))
    tools = tool_spec(body) if kind == "chat" else None
    if kind == "text" and body.get("tools"):
        raise invalid("'tools' is for chat completions", "tools", "unsupported_parameter")
    if tools is not None:
        if sampling["constraint"] is not None:
            raise invalid("'response_format' cannot be combined with 'tools'", "response_format",
                          "unsupported_value")
        sampling["constraint"] = tools.constraint
    sampling = {k: v for k, v in sampling.items() if v is not None}
    route = route_choice(body.get("shoal"), route_header)
    extension = body.get("shoal")
    keep = parse_keep_alive(extension.get("keep_alive"), "shoal.keep_alive") if extension else None
    if kind == "chat":
        messages = _messages(body)
        return CompletionRequest(
            kind, model, stream, include_usage, max_tokens,
            messages=_with_tools(messages, tools) if tools is not None else messages, sampling=sampling,
            route=route, tools=tools, keep_alive=keep,
        )
    return CompletionRequest(
        kind, model, stream, include_usage, max_tokens, prompt=_prompt(body), sampling=sampling, route=route,
        keep_alive=keep,
    )
