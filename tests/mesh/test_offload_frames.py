"""The tokens of an offload on the wire (`split.offload_frames`): a frame the serving side builds while it
is behind carries the following tokens in `more`; the origin takes a frame only if every token in it is well
formed and in order (else the peer is treated as lost and the request re-planned)."""

from __future__ import annotations

from shoal.mesh.split.offload_frames import (
    COALESCED_TEXT,
    MAX_COALESCED,
    TokenFrame,
    token_body,
    token_events,
)
from shoal.models.requests import EventLogprobs, TokenEvent, TokenLogprob


def event(i: int, text: str = "x", finish: str | None = None, **kw: object) -> TokenEvent:
    return TokenEvent(token_id=100 + i, text=text, finish_reason=finish, prompt_tokens=5,  # type: ignore[arg-type]
                      completion_tokens=i + 1, **kw)


def frame_of(events: list[TokenEvent], rid: int = 7) -> dict:
    frame = TokenFrame(rid)
    for i, e in enumerate(events):
        frame.add(token_body(e, i), e)
    return frame.take()


def test_one_frame_carries_the_tokens_that_follow_in_order() -> None:
    events = [event(0, "He"), event(1, "llo"), event(2, "!", "stop")]
    frame = frame_of(events)
    assert frame["rid"] == 7 and frame["index"] == 0 and [m["index"] for m in frame["more"]] == [1, 2]
    got = token_events(frame, 0)
    assert got is not None and [(g.token_id, g.text, g.index, g.finish_reason) for g in got] == \
        [(100, "He", 0, None), (101, "llo", 1, None), (102, "!", 2, "stop")]
    assert token_events(frame, 1) is None  # the origin expected another index
    single = frame_of(events[:1])
    assert "more" not in single and len(token_events(single, 0) or []) == 1


def test_a_frame_that_breaks_the_format_is_refused() -> None:
    good = frame_of([event(0), event(1), event(2)])
    bad = [
        {**good, "more": "x"},
        {**good, "more": []},
        {**good, "more": [1]},
        {**good, "more": [{**good["more"][0], "index": 2}, good["more"][1]]},  # out of order
        {**good, "more": [{**good["more"][0], "token": "5"}, good["more"][1]]},
        {**good, "finish": "stop"},  # a token after the finish
        {**good, "more": [good["more"][0]] * MAX_COALESCED},  # too many, and out of order
    ]
    for frame in bad:
        assert token_events(frame, 0) is None, frame


def test_the_frame_is_bounded_and_never_joins_logprobs_or_a_finish() -> None:
    frame = TokenFrame(1)
    for i in range(MAX_COALESCED):
        e = event(i)
        frame.add(token_body(e, i), e)
        assert frame.has_room(e) is (i < MAX_COALESCED - 1)  # full at MAX_COALESCED
    assert len(frame.take()["more"]) == MAX_COALESCED - 1 and frame.frames == 1
    long = event(0, "y" * COALESCED_TEXT)
    frame.add(token_body(long, 0), long)
    assert not frame.has_room(long)
    frame.take()
    chosen = TokenLogprob(100, "x", b"x", -0.5)
    with_logprobs = event(0, logprobs=EventLogprobs(chosen, (chosen,)))
    frame.add(token_body(with_logprobs, 0), with_logprobs)
    assert not frame.has_room(with_logprobs)
    frame.take()
    last = event(0, finish="length")
    frame.add(token_body(last, 0), last)
    assert not frame.has_room(last)
