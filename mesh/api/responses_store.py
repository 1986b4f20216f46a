"""The node's recent `/v1/responses` answers, kept in memory for `previous_response_id` and
`GET /v1/responses/{id}`.

Each entry is the response object as the client got it, plus the conversation that led to it in chat form
(the input messages without `instructions`, then the answer: text, or the assistant's tool call). A request
with `previous_response_id` continues that conversation. The store is bounded by count and by size
(oldest forgotten first); a request with `store: false` is not kept. Nothing survives a restart.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

MAX_RESPONSES = 256
"""Responses kept per node."""
MAX_BYTES = 16 * 1024 * 1024
"""Their total size (the conversation and the object, as JSON)."""


@dataclass(frozen=True)
class StoredResponse:
    """One kept answer."""

    object: dict[str, Any]
    """The response object as it was returned (`status`, `output`, `usage`, ...)."""
    conversation: list[dict[str, Any]]
    """Chat messages (OpenAI chat shape: `role`, `content`, `tool_calls`, `tool_call_id`) up to and including
    the answer; `instructions` are not part of it (a follow-up gives its own)."""
    size: int


class ResponseStore:
    """Recent responses by id, bounded by `max_responses` and `max_bytes` (least recently kept go first)."""

    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES) -> None:
        if max_responses < 1 or max_bytes < 1:
            raise ValueError("the response store needs room for at least one response")
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, response_id: str, obj: dict[str, Any], conversation: list[dict[str, Any]]) -> bool:
        """Keep a response; False (and nothing kept) when it alone is over `max_bytes`."""
        size = len(orjson.dumps(obj)) + len(orjson.dumps(conversation))
        if size > self.max_bytes:
            return False
        self.pop(response_id)
        self._items[response_id] = StoredResponse(obj, conversation, size)
        self._bytes += size
        while len(self._items) > self.max_responses or self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def pop(self, response_id: str) -> StoredResponse | None:
        found = self._items.pop(response_id, None)
        if found is not None:
            self._bytes -= found.size
        return found


RESPONSES: web.AppKey[ResponseStore] = web.AppKey("responses")
"""The app's response store (set by `responses_routes.add_routes`)."""
