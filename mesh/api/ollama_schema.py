"""Ollama's `/api/chat` and `/api/generate` bodies as the OpenAI path's `CompletionRequest`.

A body is rewritten into the OpenAI shape and checked by `openai_schema.parse_completion_request`, so both
dialects share one set of rules; an error names the Ollama field (`options.num_predict`, not `max_tokens`).
`options` keys shoal honours map to sampling fields; runtime knobs that do not change the answer (`num_ctx`,
`num_thread`, `num_gpu`, `use_mmap`, …) are accepted and ignored; sampling features shoal lacks (`mirostat`,
`typical_p`, `tfs_z`, `penalize_newline`) are refused unless set to their neutral value; anything else unknown
is a 400 naming it. `format` (`"json"` or a JSON Schema) constrains the answer as OpenAI's `response_format`
does; `tools` (chat) work as OpenAI's with `tool_choice` auto; `images`, `template`, `suffix`, `context` and
`think` are refused. `keep_alive` (`"5m"`, seconds, negative: forever, 0: unload after the request) sets how
long the model stays loaded afterwards (`mesh.api.keep_alive`); a chat without messages or a generate without
a prompt only loads the model — or, with `keep_alive: 0`, unloads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from shoal.mesh.api.errors import ApiError, invalid
from shoal.mesh.api.keep_alive import parse_keep_alive
from shoal.mesh.api.openai_schema import CompletionRequest, parse_completion_request

OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
"""Ollama option -> OpenAI body field."""
IGNORED_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "vocab_only", "use_mmap",
    "use_mlock", "num_thread", "numa", "num_keep", "repeat_last_n", "mirostat_tau", "mirostat_eta",
})
NEUTRAL_OPTIONS: dict[str, Any] = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0, "penalize_newline": False}
REFUSED_FIELDS = ("images", "template", "suffix", "context")
IGNORED_FIELDS = ("options", "stream", "raw", "system", "think", "logprobs", "top_logprobs")
MODEL_TAG = ":latest"


@dataclass(frozen=True)
class OllamaRequest:
    """A validated Ollama request: the shared `CompletionRequest` and the body it was checked as."""

    completion: CompletionRequest
    body: dict[str, Any]
    """The OpenAI-shaped body (for `generation.prepare`'s error messages)."""
    keep_alive: float | None = None
    """Seconds the model stays loaded after this request (negative: forever); None: the node's default."""


@dataclass(frozen=True)
class WarmRequest:
    """A chat without messages or a generate without a prompt: load `model` (or unload it: keep_alive 0)."""

    model: str
    keep_alive: float | None


def model_name(value: Any) -> str:
    """The shoal model a request names (`name` or `name:latest`); 400 when missing or not a string."""
    if not isinstance(value, str) or not value:
        raise invalid("'model' is required: a model name from /api/tags", "model",
                      "missing_required_parameter")
    return value[: -len(MODEL_TAG)] if value.endswith(MODEL_TAG) else value


def _options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise invalid("'options' must be an object", "options", "invalid_type")
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = str(key)[:40]
        if key in OPTIONS:
            if key == "num_predict" and isinstance(value, int) and not isinstance(value, bool) and value < 0:
                continue  # -1 (no limit) and -2 (fill the context): shoal's default, the rest of the context
            out[OPTIONS[key]] = value
        elif key in NEUTRAL_OPTIONS:
            if value is not None and value != NEUTRAL_OPTIONS[key]:
                raise invalid(f"option '{name}' is not supported by shoal; leave it out", f"options.{name}",
                              "unsupported_parameter")
        elif key not in IGNORED_OPTIONS:
            raise invalid(f"option '{name}' is not known to shoal", f"options.{name}", "unknown_parameter")
    return out


def check_options(options: Any) -> None:
    """400 naming a bad or unknown option (for endpoints that use none of them, e.g. `/api/embed`)."""
    _options(options)


def _refuse(body: dict[str, Any]) -> None:
    for name in REFUSED_FIELDS:
        if body.get(name) not in (None, "", [], {}):
            raise invalid(f"'{name}' is not supported by shoal; leave it out", name, "unsupported_parameter")
    think = body.get("think")
    if think not in (None, False):
        raise invalid("'think' is not supported by shoal (no thinking models)", "think", "unsupported_value")


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean", "stream", "invalid_type")
    return stream


def _logprobs(body: dict[str, Any], kind: Literal["chat", "text"]) -> dict[str, Any]:
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise invalid("'logprobs' must be a boolean", "logprobs", "invalid_type")
    if not wanted:
        return {"top_logprobs": top} if top is not None else {}
    if kind == "chat":
        return {"logprobs": True, "top_logprobs": top}
    return {"logprobs": 0 if top is None else top}


def keep_alive(body: dict[str, Any]) -> float | None:
    """The body's `keep_alive` in seconds (negative: forever), None when absent; 400 when malformed."""
    return parse_keep_alive(body.get("keep_alive"))


def _translate(
    body: dict[str, Any], openai_body: dict[str, Any], kind: Literal["chat", "text"]
) -> OllamaRequest:
    openai_body.update(_options(body.get("options")))
    openai_body.update(_logprobs(body, kind))
    fmt = body.get("format")
    if fmt == "json":
        openai_body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        schema = {"name": "format", "schema": fmt}
        openai_body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt not in (None, ""):
        raise invalid("'format' must be \"json\" or a JSON Schema object", "format", "invalid_value")
    openai_body["stream"] = False  # the Ollama route streams itself
    try:
        req = parse_completion_request(openai_body, kind, 1 << 20)
    except ApiError as exc:
        raise renamed(exc) from None
    return OllamaRequest(req, openai_body, keep_alive(body))


def renamed(exc: ApiError) -> ApiError:
    """`exc` with its OpenAI field name turned into the Ollama one."""
    back = {v: f"options.{k}" for k, v in OPTIONS.items()}
    param = back.get(exc.param or "", exc.param)
    if param and param.startswith("response_format"):
        param = "format"
    message = exc.message.replace(f"'{exc.param}'", f"'{param}'") if param != exc.param else exc.message
    return ApiError(exc.status, message, param=param, code=exc.code, type=exc.type)


def parse_chat(body: Any) -> tuple[OllamaRequest | WarmRequest, bool]:
    """`/api/chat`: (the request — a `WarmRequest` when there are no messages —, whether to stream)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    _refuse(body)
    messages = body.get("messages")
    if messages is None or messages == []:
        name = model_name(body.get("model"))
        _options(body.get("options"))
        return WarmRequest(name, keep_alive(body)), _stream(body)
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if isinstance(message, dict) and message.get("images"):
                raise invalid("images are not supported by shoal (text only)", f"messages[{i}].images",
                              "unsupported_value")
    name = model_name(body.get("model"))
    chat: dict[str, Any] = {"model": name, "messages": _openai_messages(messages)}
    if body.get("tools"):
        chat["tools"] = body["tools"]
    return _translate(body, chat, "chat"), _stream(body)


def _openai_messages(messages: Any) -> Any:
    """Ollama's assistant `tool_calls` (arguments as an object) in OpenAI's shape (arguments as JSON text)."""
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list):
            converted = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), dict):
                    fn = {**fn, "arguments": json.dumps(fn["arguments"])}
                converted.append({"type": "function", "function": fn})
            message = {**message, "tool_calls": converted}
        out.append(message)
    return out


def parse_generate(body: Any) -> tuple[OllamaRequest | WarmRequest, bool]:
    """`/api/generate`: (the request — a `WarmRequest` when the prompt is empty (Ollama then just loads, or
    with keep_alive 0 unloads, the model) —, whether to stream). `raw` sends the prompt as is; otherwise it
    becomes a chat turn (after `system`, if given) through the model's chat template."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    _refuse(body)
    name = model_name(body.get("model"))
    prompt, system, raw = body.get("prompt"), body.get("system"), body.get("raw", False)
    if prompt is not None and not isinstance(prompt, str):
        raise invalid("'prompt' must be a string", "prompt", "invalid_type")
    if system is not None and not isinstance(system, str):
        raise invalid("'system' must be a string", "system", "invalid_type")
    if not isinstance(raw, bool):
        raise invalid("'raw' must be a boolean", "raw", "invalid_type")
    stream = _stream(body)
    if not prompt:
        _options(body.get("options"))
        return WarmRequest(name, keep_alive(body)), stream
    if raw:
        if system:
            raise invalid("'system' does not apply to a raw prompt", "system", "unsupported_value")
        return _translate(body, {"model": name, "prompt": prompt}, "text"), stream
    turn = [{"role": "user", "content": prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + turn
    return _translate(body, {"model": name, "messages": messages}, "chat"), stream
