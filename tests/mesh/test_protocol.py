from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.errors import ProtocolError


def test_control_round_trip():
    frame = p.ControlFrame("ping", {"t": 1.5}, id=7)
    assert p.decode_control(p.encode_control(frame)) == frame
    reply = p.ControlFrame("reply", {"ok": True}, re=7)
    assert p.decode_control(p.encode_control(reply).decode()) == reply


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"v":2,"t":"ping","b":{}}',
        b'{"v":1,"t":"nope","b":{}}',
        b'{"v":1,"t":"ping","b":[]}',
        b'{"v":1,"t":"ping","b":{},"id":-1}',
        b'{"v":1,"t":"ping","b":{},"id":1.5}',
        b'{"v":1,"t":"ping","b":{},"x":1}',
        b'{"v":1,"t":"ping","b":{"pad":"' + b"a" * 300 + b'"}}',
    ],
)
def test_bad_control_frames_raise_protocol_error(data):
    with pytest.raises(ProtocolError):
        p.decode_control(data)


def test_oversized_control_frame_refused_on_encode():
    with pytest.raises(ProtocolError):
        p.encode_control(p.ControlFrame("ping", {"pad": "a" * 1000}))


def test_binary_chunking_round_trip():
    payload = os.urandom(700_000)
    frame = p.BinaryFrame(p.BLOCK, 9, {"cid": "bafy"}, payload)
    messages = p.encode_binary(frame, max_message=65_536)
    assert len(messages) > 10 and all(len(m) <= 65_536 for m in messages)
    joiner = p.Reassembler(p.BLOCKS)
    results = [joiner.feed(m) for m in messages]
    assert results[:-1] == [None] * (len(messages) - 1)
    assert results[-1] == frame


def test_binary_wrong_channel_and_limits():
    message = p.encode_binary(p.BinaryFrame(p.TENSOR, 1, {}, b"x"))[0]
    with pytest.raises(ProtocolError):
        p.Reassembler(p.BLOCKS).feed(message)
    with pytest.raises(ProtocolError):
        p.encode_binary(p.BinaryFrame(p.BLOCK, 1, {}, b"x" * (4 * 1024 * 1024 + 1)))
    # a frame that keeps growing past the kind's limit is refused while reassembling
    joiner = p.Reassembler(p.BLOCKS)
    first = p.HEADER.pack(p.MAGIC, 1, p.BLOCK, 0, 0, 5, 0) + b"a" * 200_000
    joiner.feed(first)
    with pytest.raises(ProtocolError):
        for index in range(1, 40):
            joiner.feed(p.HEADER.pack(p.MAGIC, 1, p.BLOCK, 0, 0, 5, index) + b"a" * 200_000)


def test_out_of_order_chunk_refused():
    messages = p.encode_binary(p.BinaryFrame(p.BLOCK, 3, {}, b"z" * 300), max_message=100)
    joiner = p.Reassembler(p.BLOCKS)
    joiner.feed(messages[0])
    with pytest.raises(ProtocolError):
        joiner.feed(messages[2])


def test_register_control_type():
    p.register_control_type("stage.forward", 8192)
    assert (
        p.decode_control(p.encode_control(p.ControlFrame("stage.forward", {"a": 1}))).type == "stage.forward"
    )
    with pytest.raises(ValueError):
        p.register_control_type("bad name!", 100)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_control_decoder_only_raises_protocol_error(data):
    try:
        frame = p.decode_control(data)
    except ProtocolError:
        return
    assert frame.type in p.CONTROL_LIMITS


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "t", "b", "id", "re", "zz"]), json_values))
def test_fuzz_structured_control_frames(message):
    import orjson

    try:
        p.decode_control(orjson.dumps(message))
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=600), max_size=8), st.sampled_from([p.BLOCKS, p.TENSORS]))
def test_fuzz_binary_reassembler_only_raises_protocol_error(messages, channel):
    joiner = p.Reassembler(channel)
    for message in messages:
        for candidate in (message, p.MAGIC + bytes([1]) + message):
            try:
                joiner.feed(candidate)
            except ProtocolError:
                pass


def test_reassembler_bounds_total_buffered_bytes():
    joiner = p.Reassembler(p.TENSORS, max_bytes=500_000)
    chunk = b"t" * 200_000
    joiner.feed(p.HEADER.pack(p.MAGIC, 1, p.TENSOR, 0, 0, 1, 0) + chunk)
    joiner.feed(p.HEADER.pack(p.MAGIC, 1, p.TENSOR, 0, 0, 3, 0) + chunk)
    assert joiner.buffered == 400_000
    with pytest.raises(ProtocolError):
        joiner.feed(p.HEADER.pack(p.MAGIC, 1, p.TENSOR, 0, 0, 5, 0) + chunk)
    # finishing a frame releases its bytes
    frame = joiner.feed(p.HEADER.pack(p.MAGIC, 1, p.TENSOR, p.FLAG_LAST, 0, 1, 1) + b"end")
    assert frame is not None and len(frame.payload) == 200_003
    assert joiner.buffered == 200_000
