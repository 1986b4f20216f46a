"""The native step lane (mesh/split/step_lane.py, mesh/split/native/steplane.c), checked against the generic
path it stands in for: a steady step it takes reads exactly as `wire.decode_input` + `check_inputs` read it,
anything else it hands back so that the generic reader sees the same bytes (and fails the same way), and
every answer it seals is byte for byte the record `wire.encode_input` / `encode_hidden` / `encode_logits`
make. The stage hosts' own use of it (tokens equal to one stage, steps really taken natively) is in
tests/mesh/test_tensor_link.py and tests/mesh/test_split_chain.py, which run with and without it.
"""

from __future__ import annotations

import os
import socket
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shoal.mesh.p2p.protocol import TENSOR, BinaryFrame
from shoal.mesh.split import native, wire
from shoal.mesh.split import tensor_link as tl
from shoal.mesh.split.hosted import check_inputs

HIDDEN = 576
VOCAB = 49152
SEQ = 7


class Middle:
    """A hidden-states stage's view: the first stage is elsewhere."""

    class span:
        @staticmethod
        def is_first() -> bool:
            return False

    class config:
        hidden_size = HIDDEN
        vocab_size = VOCAB


def step_frame(call: int, step: int, values: np.ndarray, op: str = "forward", seq: int = SEQ,
               top_k: int = 0) -> BinaryFrame:
    return wire.encode_input(call, op, step, [seq], values, top_k)


class Link:
    """Both ends of a sealed link over a socket pair, as `tensor_link` runs them: the origin `send`s steps,
    the stage `answer`s."""

    def __init__(self) -> None:
        key = os.urandom(32)
        self.origin_sock, self.stage_sock = socket.socketpair()
        self.origin_sock.settimeout(2.0)
        self.stage_sock.settimeout(2.0)
        self.origin = tl.Sealer(key, tl.TO_STAGE)
        self.stage = tl.Sealer(key, tl.TO_ORIGIN)
        self.records = tl.RecordStream(self.stage_sock, self.stage)

    def send(self, frame: BinaryFrame) -> bytes:
        record = self.origin.seal(tl.encode_frame(frame))
        self.origin_sock.sendall(record)
        return record

    def answer(self, frame: BinaryFrame) -> None:
        self.stage_sock.sendall(self.stage.seal(tl.encode_frame(frame)))

    def close(self) -> None:
        self.origin_sock.close()
        self.stage_sock.close()


@pytest.fixture
def link():
    built = Link()
    yield built
    built.close()


def head_of(frame: BinaryFrame) -> bytes:
    return frame.payload[: wire.INPUT_HEAD.size + wire.ONE_SEQ.size]


def generic(frame: BinaryFrame) -> tuple[int, int, np.ndarray]:
    message = wire.decode_input(frame)
    return message.call, message.step, check_inputs(Middle, message)


def test_a_steady_step_reads_as_the_generic_path_reads_it(lane: ModuleType, link: Link) -> None:
    rng = np.random.default_rng(1)
    armed = step_frame(1, 10, rng.standard_normal((1, HIDDEN), dtype=np.float32))
    inputs = np.empty((1, HIDDEN), np.float32)
    for call, step in [(2, 11), (3, 12), (2**32 - 1, wire.MAX_STEP)]:
        values = rng.standard_normal((1, HIDDEN), dtype=np.float32)
        frame = step_frame(call, step, values)
        link.send(frame)
        taken = link.records.take_step(lane, head_of(armed), inputs)
        assert taken == (call << 32 | step)
        want_call, want_step, want_inputs = generic(frame)
        assert (taken >> 32, taken & 0xFFFF_FFFF) == (want_call, want_step)
        assert np.array_equal(inputs, want_inputs)


def variants(values: np.ndarray) -> dict[str, BinaryFrame]:
    """Steps the lane armed for `step_frame(…, values)` must not take, each with why."""
    bad = values.copy()
    bad[0, 100] = np.inf
    nan = values.copy()
    nan[0, 5] = np.nan
    return {
        "another sequence": step_frame(5, 11, values, seq=SEQ + 1),
        "another op": step_frame(5, 11, values, op="chain"),
        "another top_k": step_frame(5, 11, values, top_k=3),
        "float16 values": wire.encode_input(5, "forward", 11, [SEQ], values, fp16=True),
        "two rows": wire.encode_input(5, "forward", 11, [SEQ, SEQ + 1], np.vstack([values, values])),
        "an infinite value": step_frame(5, 11, bad),
        "a NaN": step_frame(5, 11, nan),
        "a step out of bounds": BinaryFrame(TENSOR, 5, {}, step_frame(5, 0, values).payload[:4]
                                            + (wire.MAX_STEP + 1).to_bytes(4, "little")
                                            + step_frame(5, 0, values).payload[8:]),
        "a shorter array": BinaryFrame(TENSOR, 5, {}, step_frame(5, 11, values).payload[:-4]),
        "a prefill": wire.encode_input(5, "prefill", 11, [SEQ], np.vstack([values] * 3)),
    }


@pytest.mark.parametrize("case", list(variants(np.zeros((1, HIDDEN), np.float32))))
def test_any_other_step_goes_to_the_generic_reader_unchanged(lane: ModuleType, link: Link, case: str) -> None:
    values = np.random.default_rng(2).standard_normal((1, HIDDEN), dtype=np.float32)
    armed = step_frame(1, 10, values)
    frame = variants(values)[case]
    link.send(frame)
    inputs = np.zeros((1, HIDDEN), np.float32)
    assert link.records.take_step(lane, head_of(armed), inputs) is None
    assert not inputs.any()
    assert link.records.buffered()
    assert tl.decode_frame(link.records.read()) == frame  # what the generic reader would have read
    link.send(armed)  # the counters stayed in step: the next record opens either way
    assert link.records.take_step(lane, head_of(armed), inputs) == (1 << 32 | 10)


def test_records_back_to_back_or_in_pieces_go_to_the_generic_reader(lane: ModuleType, link: Link) -> None:
    values = np.ones((1, HIDDEN), np.float32)
    armed = step_frame(1, 10, values)
    inputs = np.empty((1, HIDDEN), np.float32)
    first, second = step_frame(2, 11, values), step_frame(3, 12, values)
    link.send(first)
    link.send(second)
    assert link.records.take_step(lane, head_of(armed), inputs) is None
    assert tl.decode_frame(link.records.read()) == first
    assert link.records.buffered() and tl.decode_frame(link.records.read()) == second
    record = link.origin.seal(tl.encode_frame(step_frame(4, 13, values)))
    link.origin_sock.sendall(record[:100])
    assert link.records.take_step(lane, head_of(armed), inputs) is None
    link.origin_sock.sendall(record[100:])
    assert tl.decode_frame(link.records.read()) == step_frame(4, 13, values)


@pytest.mark.parametrize("fault", ["forged", "replayed", "closed"])
def test_a_forged_replayed_or_closed_record_fails_as_the_generic_reader_fails(lane: ModuleType, link: Link,
                                                                             fault: str) -> None:
    values = np.ones((1, HIDDEN), np.float32)
    armed = step_frame(1, 10, values)
    inputs = np.empty((1, HIDDEN), np.float32)
    record = link.origin.seal(tl.encode_frame(step_frame(2, 11, values)))
    if fault == "forged":
        forged = bytearray(record)
        forged[30] ^= 1
        link.origin_sock.sendall(bytes(forged))
    elif fault == "replayed":
        link.origin_sock.sendall(record)
        assert link.records.take_step(lane, head_of(armed), inputs) == (2 << 32 | 11)
        link.origin_sock.sendall(record)
    else:
        link.origin_sock.shutdown(socket.SHUT_WR)
    assert link.records.take_step(lane, head_of(armed), inputs) is None
    with pytest.raises(tl.LinkError):
        link.records.read()


@settings(max_examples=150, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, wire.INPUT_HEAD.size + 4 + 8), st.integers(1, 255)),
                      max_size=3),
       value=st.floats(width=32), where=st.integers(0, HIDDEN - 1))
def test_whatever_the_lane_takes_the_generic_path_takes_alike(lane: ModuleType, flips: list[tuple[int, int]],
                                                              value: float, where: int) -> None:
    """Mutated steps (header bytes, values of any kind): the lane takes one only when the generic path
    accepts it, and then reads the same call, step and values."""
    values = np.linspace(-1, 1, HIDDEN, dtype=np.float32).reshape(1, HIDDEN)
    armed = step_frame(1, 10, values)
    payload = bytearray(step_frame(9, 20, values).payload)
    for at, xor in flips:
        payload[at] ^= xor
    at = wire.INPUT_HEAD.size + 4 + 4 * where
    payload[at:at + 4] = np.float32(value).tobytes()
    frame = BinaryFrame(TENSOR, 9, {}, bytes(payload))
    link = Link()
    try:
        link.send(frame)
        inputs = np.zeros((1, HIDDEN), np.float32)
        taken = lane_take(lane, link, armed, inputs)
        try:
            want = generic(frame)
        except wire.FrameError:
            want = None
        if taken is not None:
            assert want is not None
            assert (taken >> 32, taken & 0xFFFF_FFFF) == want[:2]
            assert np.array_equal(inputs, want[2])
        else:
            assert tl.decode_frame(link.records.read()) == frame
            # every frame of the armed form that the generic path accepts is the lane's
            assert want is None or bytes(payload[:4]) + bytes(payload[8:26]) != (
                head_of(armed)[:4] + head_of(armed)[8:])
    finally:
        link.close()


def lane_take(lane: ModuleType, link: Link, armed: BinaryFrame, inputs: np.ndarray) -> int | None:
    return link.records.take_step(lane, head_of(armed), inputs)


# --- answers ----------------------------------------------------------------------------------------------

def sent_by_lane(lane: ModuleType, call: int, head: bytes, step: int, values: np.ndarray, *, micros: int = 0,
                 top_1: bool = False, micros_at: int = -1) -> bytes:
    """The plaintext of the record the lane seals and sends."""
    key = os.urandom(32)
    stage, origin = tl.Sealer(key, tl.TO_ORIGIN), tl.Sealer(key, tl.TO_STAGE)
    ours, theirs = socket.socketpair()
    try:
        stage.send_native(lane, ours, call, head, step, micros, values, top_1=top_1, micros_at=micros_at)
        return tl.read_record(theirs, origin)
    finally:
        ours.close()
        theirs.close()


def test_answers_are_the_records_the_generic_path_makes(lane: ModuleType) -> None:
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((1, HIDDEN), dtype=np.float32)
    forward = wire.INPUT_HEAD.pack(wire.OPS_IN["forward"], wire.F32, wire.F32, 2, 0, 1, HIDDEN, 1, 1) \
        + wire.ONE_SEQ.pack(77)
    assert sent_by_lane(lane, 5, forward, 31, hidden) == tl.encode_frame(
        wire.encode_input(5, "forward", 31, [77], hidden, 1))
    as_hidden = wire.OUTPUT_HEAD.pack(wire.OPS_OUT["hidden"], wire.F32, 2, 0, 0, 1, HIDDEN, 0, 0)
    assert sent_by_lane(lane, 6, as_hidden, 32, hidden, micros=1234, micros_at=wire.MICROS_AT) == \
        tl.encode_frame(wire.encode_hidden(6, 32, hidden, compute_s=0.001234))
    logits_head = wire.OUTPUT_HEAD.pack(wire.OPS_OUT["logits"], wire.F32, 2, 0, 0, 1, VOCAB, 1, 0)
    rows = {"random": rng.standard_normal((1, VOCAB), dtype=np.float32)}
    rows["ties"] = np.zeros((1, VOCAB), np.float32)
    rows["ties"][0, [300, 9, 40000]] = 5.0
    rows["a NaN"] = rows["random"].copy()
    rows["a NaN"][0, [70, 90]] = np.nan
    rows["infinities"] = np.full((1, VOCAB), -np.inf, np.float32)
    rows["infinities"][0, 12] = np.inf
    for name, row in rows.items():
        assert sent_by_lane(lane, 7, logits_head, 33, row, micros=99, top_1=True, micros_at=wire.MICROS_AT) \
            == tl.encode_frame(wire.encode_logits(7, 33, row, 1, 0.000099)), name


def test_a_one_way_link_the_peer_closed_is_not_written(lane: ModuleType) -> None:
    """As `TensorLinkClient.send`: a link used one way turns readable once its peer closed it."""
    key = os.urandom(32)
    sealer = tl.Sealer(key, tl.TO_STAGE)
    ours, theirs = socket.socketpair()
    theirs.close()
    try:
        with pytest.raises(tl.LinkError, match="closed"):
            sealer.send_native(lane, ours, 1, b"\0" * 26, 1, 0, np.zeros((1, 4), np.float32),
                               closed_check=True)
    finally:
        ours.close()


# --- the origin's read of an answer -----------------------------------------------------------------------

def argmax_call(lane: ModuleType, request_id: int) -> tl.NativeCall:
    head = wire.input_head("chain", 0, [SEQ], np.zeros((1, HIDDEN), np.float32), 1)
    return tl.NativeCall(lane, request_id, head, 0, np.zeros((1, HIDDEN), np.float32),
                         wire.logits_head(0, 1, VOCAB, 1), VOCAB)


def test_an_argmax_answer_reads_as_decode_output_reads_it(lane: ModuleType) -> None:
    link = Link()
    try:
        rng = np.random.default_rng(4)
        for call in (1, 2, 2**32 - 1):
            row = rng.standard_normal((1, VOCAB), dtype=np.float32)
            frame = wire.encode_logits(call, call, row, 1, 0.004321)
            link.answer(frame)
            got = link.origin.answer_native(lane, link.origin_sock, argmax_call(lane, call))
            want = wire.decode_output(frame, VOCAB)
            assert got is not None
            assert got >> 32 == int(want.top_ids[0, 0]) == int(row.argmax())
            assert (got & 0xFFFF_FFFF) / 1e6 == want.compute_s
            message = wire.argmax_message(call, got >> 32, got & 0xFFFF_FFFF)
            assert message.top_ids.tolist() == [[row.argmax()]] and message.compute_s == want.compute_s
    finally:
        link.close()


def other_answers(call: int) -> dict[str, BinaryFrame]:
    row = np.arange(VOCAB, dtype=np.float32).reshape(1, VOCAB)
    out_of_range = bytearray(wire.encode_logits(call, call, row, 1).payload)
    out_of_range[wire.OUTPUT_HEAD.size:wire.OUTPUT_HEAD.size + 4] = VOCAB.to_bytes(4, "little")
    two_rows = np.vstack([row, row])
    return {
        "another call": wire.encode_logits(call + 1, call, row, 1),
        "an error": wire.encode_error(call, call, wire.INTERNAL, "stage failed"),
        "top-k logits": wire.encode_logits(call, call, row, 8),
        "two rows": wire.encode_logits(call, call, two_rows, 1),
        "hidden states": wire.encode_hidden(call, call, np.ones((1, HIDDEN), np.float32)),
        "an id past the vocabulary": BinaryFrame(TENSOR, call, {}, bytes(out_of_range)),
    }


@pytest.mark.parametrize("case", list(other_answers(1)))
def test_any_other_answer_is_left_on_the_socket_for_the_generic_reader(lane: ModuleType, case: str) -> None:
    link = Link()
    try:
        frame = other_answers(5)[case]
        link.answer(frame)
        assert link.origin.answer_native(lane, link.origin_sock, argmax_call(lane, 5)) is None
        assert tl.decode_frame(tl.read_record(link.origin_sock, link.origin)) == frame
        good = wire.encode_logits(6, 6, np.eye(1, VOCAB, 17, dtype=np.float32), 1)
        link.answer(good)  # the counters stayed in step
        assert link.origin.answer_native(lane, link.origin_sock, argmax_call(lane, 6)) == 17 << 32
    finally:
        link.close()


@pytest.mark.parametrize("fault", ["forged", "in pieces", "bytes past it", "closed"])
def test_a_broken_answer_is_left_to_the_generic_reader(lane: ModuleType, fault: str) -> None:
    link = Link()
    try:
        answer = wire.encode_logits(5, 5, np.ones((1, VOCAB), np.float32), 1)
        record = link.stage.seal(tl.encode_frame(answer))
        if fault == "forged":
            link.stage_sock.sendall(record[:30] + bytes([record[30] ^ 1]) + record[31:])
        elif fault == "in pieces":
            link.stage_sock.sendall(record[:20])
        elif fault == "bytes past it":
            link.stage_sock.sendall(record + b"\0")
        else:
            link.stage_sock.close()
        assert link.origin.answer_native(lane, link.origin_sock, argmax_call(lane, 5)) is None
        if fault == "in pieces":
            link.stage_sock.sendall(record[20:])
            assert tl.decode_frame(tl.read_record(link.origin_sock, link.origin)).request_id == 5
        else:
            with pytest.raises(tl.LinkError):
                tl.read_record(link.origin_sock, link.origin)
    finally:
        link.close()


# --- building it ------------------------------------------------------------------------------------------

def test_a_node_that_cannot_build_the_lane_says_why_and_runs_without_it(monkeypatch, tmp_path, caplog
                                                                         ) -> None:
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failed", None)
    assert native.status() == "not built"
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.steplane(tmp_path) is None
    assert native.loaded() is None
    assert native.status() == "off: no C compiler (cc, gcc or clang) on PATH"
    assert "native step lane is off" in caplog.text
    assert native.steplane(tmp_path) is None
    assert caplog.text.count("native step lane is off") == 1  # said once


def test_a_source_that_does_not_compile_is_reported_with_the_compilers_words(lane: ModuleType, monkeypatch,
                                                                             tmp_path) -> None:
    broken = tmp_path / "steplane.c"
    broken.write_text("this is not C;\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(RuntimeError, match=r"failed: .*error"):
        native._build(tmp_path / "native" / "_steplane-x.so")
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-built is left for a later load
