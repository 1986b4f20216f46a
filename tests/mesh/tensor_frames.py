"""Raw tensor frames for tests that feed stages malformed input: `mesh.split_wire.encode_input` refuses to
build them, so these pack the header fields as given."""

from __future__ import annotations

from shoal.mesh.p2p.protocol import BinaryFrame
from shoal.mesh.split import wire

HIDDEN = 576


def raw_input(*, op: int = 2, dtype: int = wire.F32, reply: int = wire.F32, ndim: int = 2, step: int = 1,
              rows: int = 1, cols: int = HIDDEN, top_k: int = 8, seqs: tuple[int, ...] = (4242,),
              count: int | None = None, data: bytes | None = None) -> bytes:
    """An origin → stage payload (a good decode frame of one f32 row unless told otherwise)."""
    ids = b"".join(s.to_bytes(4, "little") for s in seqs)
    if data is None:
        data = bytes(rows * cols * 4)
    head = wire.INPUT_HEAD.pack(op, dtype, reply, ndim, step, rows, cols, top_k,
                                len(seqs) if count is None else count)
    return head + ids + data


def reply_fields(payload: bytes) -> dict[str, object]:
    """A stage → origin payload's header as a dict (op by name)."""
    op, dtype, ndim, _, step, rows, cols, top_k, compute_us = wire.OUTPUT_HEAD.unpack_from(payload)
    return {"op": wire.OP_NAMES.get(op, op), "dtype": dtype, "ndim": ndim, "step": step, "rows": rows,
            "cols": cols, "top_k": top_k, "compute_us": compute_us}


def error_code(frame: BinaryFrame) -> str | None:
    """The error code of a stage's reply, or None if it is not an error."""
    message = wire.decode_output(frame, vocab=1)  # an error frame carries no array
    return message.error[0] if message.error else None
