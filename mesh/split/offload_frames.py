"""The tokens of an offload on the wire (`offload.token`): the serving side's frame, the origin's check of it.
Pure: no I/O.

A frame is one token's body — `rid`, `index`, `token`, `text`, `prompt_tokens`, `completion_tokens`,
`finish`, and where they apply `logprobs` and `stop_index` (the matched stop string's place in the request's
`stop` list) — plus, when the origin asked for it (`coalesce` in `offload.open`) and the sender fell behind,
`more`: the bodies (without `rid`) of the tokens that follow, produced before this frame went out. At most
`MAX_COALESCED` tokens a frame, `COALESCED_TEXT` characters of text, and none with logprobs (those frames
are large already), so a frame stays within `offload.token`'s limit (`split.wire`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shoal.mesh.split import wire
from shoal.models.generate import TokenEvent
from shoal.models.requests import EventLogprobs

MAX_COALESCED = 16
"""Most tokens one `offload.token` frame carries (its own and those in `more`)."""
COALESCED_TEXT = 512
"""Most characters of text the tokens of one frame carry together: with JSON's escapes (up to 6 bytes a
character) and the fields of 16 tokens, the frame stays within `offload.token`'s 6 KiB."""


@dataclass(frozen=True)
class OffloadEvent:
    """One streamed token, shaped like `models.generate.TokenEvent` where the API reads it."""

    token_id: int
    text: str
    index: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: EventLogprobs | None = None
    """The token's log-probabilities when the request asked for them (carried in `offload.token`)."""
    stop_sequence: str | None = None
    """The stop string that ended the answer (carried as `stop_index`, its place in the request's stops)."""
    queued_s: float = 0.0
    """Admission wait on this node (the API's metric reads it from the first event): an offload waits on the
    peer, not here."""


def token_body(event: TokenEvent, index: int, stops: Sequence[str] = ()) -> dict[str, Any]:
    """The wire body of the `index`th token of a request whose stop strings are `stops` (without `rid`)."""
    body: dict[str, Any] = {
        "index": index,
        "token": int(event.token_id),
        "text": event.text,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "finish": event.finish_reason,
    }
    if event.logprobs is not None:
        body["logprobs"] = wire.encode_logprobs(event.logprobs)
    if event.stop_sequence is not None and event.stop_sequence in stops:
        body["stop_index"] = list(stops).index(event.stop_sequence)
    return body


class TokenFrame:
    """The serving side's next `offload.token` frame: the first token's body, then those that join it."""

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self._frame: dict[str, Any] | None = None
        self._count = 0
        self._text = 0
        self.frames = 0
        """Frames taken so far."""

    def add(self, body: dict[str, Any], event: TokenEvent) -> None:
        if self._frame is None:
            self._frame = {"rid": self.rid, **body}
        else:
            self._frame.setdefault("more", []).append(body)
        self._count += 1
        self._text += len(event.text)

    def has_room(self, last: TokenEvent) -> bool:
        """Whether the token after `last` (the one just added) may join this frame."""
        return (last.finish_reason is None and last.logprobs is None and self._count < MAX_COALESCED
                and self._text < COALESCED_TEXT)

    def take(self) -> dict[str, Any]:
        """The frame's body; the next `add` starts a new frame."""
        if self._frame is None:
            raise ValueError("no token added since the last frame")
        frame, self._frame, self._count, self._text = self._frame, None, 0, 0
        self.frames += 1
        return frame


def token_events(body: dict[str, Any], index: int, stops: Sequence[str] = ()) -> list[OffloadEvent] | None:
    """The tokens of one `offload.token` frame (its own and those in `more`), the first at `index`; None
    when the frame breaks the format: a bad field, indexes out of order, more than `MAX_COALESCED` tokens,
    a token after the finish."""
    first = token_event(body, index, stops)
    more = body.get("more")
    if first is None or more is None:
        return None if first is None else [first]
    if not isinstance(more, list) or not 0 < len(more) < MAX_COALESCED:
        return None
    events = [first]
    for item in more:
        following = token_event(item, index + len(events), stops) if isinstance(item, dict) else None
        if following is None or events[-1].finish_reason is not None:
            return None
        events.append(following)
    return events


def token_event(body: dict[str, Any], index: int, stops: Sequence[str] = ()) -> OffloadEvent | None:
    """One token's body, expected at `index`; None when a field is missing or wrong."""
    token, text, i = body.get("token"), body.get("text"), body.get("index")
    prompt, completion, finish = body.get("prompt_tokens"), body.get("completion_tokens"), body.get("finish")
    if type(token) is not int or not isinstance(text, str) or i != index:
        return None
    if type(prompt) is not int or type(completion) is not int:
        return None
    if finish is not None and not isinstance(finish, str):
        return None
    try:
        found = wire.decode_logprobs(body["logprobs"]) if body.get("logprobs") is not None else None
    except ValueError:
        return None
    stop = body.get("stop_index")
    if stop is not None and (type(stop) is not int or not 0 <= stop < len(stops) or finish is None):
        return None
    return OffloadEvent(token, text, index, prompt, completion, finish, found,
                        None if stop is None else stops[stop])
