"""OpenAI's `logprobs` objects from the engine's per-token `EventLogprobs` (pure functions).

Chat answers carry `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`; completions carry
the legacy columns `{tokens, token_logprobs, top_logprobs, text_offset}` (`top_logprobs`: one
`{token: logprob}` map per token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shoal.models.generate import EventLogprobs, TokenLogprob


def _entry(item: TokenLogprob) -> dict[str, Any]:
    return {"token": item.token, "logprob": item.logprob, "bytes": list(item.bytes)}


def chat_logprobs(events: Sequence[EventLogprobs]) -> dict[str, Any]:
    """The `logprobs` of a chat choice (or of one streamed chunk) for these tokens."""
    content = [{**_entry(e.chosen), "top_logprobs": [_entry(t) for t in e.top]} for e in events]
    return {"content": content, "refusal": None}


def completion_logprobs(events: Sequence[EventLogprobs], offset: int = 0) -> dict[str, Any]:
    """The `logprobs` of a completions choice; `offset`: characters of completion text before these tokens."""
    offsets = []
    for e in events:
        offsets.append(offset)
        offset += len(e.chosen.token)
    return {
        "tokens": [e.chosen.token for e in events],
        "token_logprobs": [e.chosen.logprob for e in events],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in events],
        "text_offset": offsets,
    }


def for_kind(kind: str, events: Sequence[EventLogprobs], offset: int = 0) -> dict[str, Any]:
    """`chat_logprobs` for kind `chat`, else `completion_logprobs`."""
    return chat_logprobs(events) if kind == "chat" else completion_logprobs(events, offset)
