"""Wire messages of offload and split: control frame types and the tensor frames stages exchange.

Pure codecs over `mesh.protocol` (which owns framing, chunking and size limits); nothing here does I/O.

Control frames (registered with `mesh.protocol.register_control_type` on import):

- `stage.open` {model, span "a:b", seq, cid?} → reply {hidden, vocab, span} — host layers `span` of `model`
  for one sequence `seq` (a u32 the caller picks, unique per link); a node that does not hold the model
  fetches only that span's bytes by `cid` (IPFS ranged reads); refused with an error frame (codes below).
- `stage.close` {seq} → reply {} — forget the sequence (idempotent).
- `offload.open` {model, prompt_ids, params} → reply {accepted} — run a whole request; then the serving side
  sends `offload.token` {rid, index, token, text} per token and one `offload.done` {rid, finish_reason,
  usage} or `offload.error` {rid, code, message}. `rid` is the `id` of the `offload.open` frame.
- `offload.cancel` {rid} — the origin gave up on the request; the server stops generating.
- `offload.info` {model} → reply {config (ModelConfig fields), vocab_size, context_length} and
  `offload.tokenize` {model, messages | text} → reply {ids}: what a node that does not hold a model needs to
  accept a request for it and offload it (its tokenizer lives with the model).

Tensor frames (binary kind `TENSOR` on the `tensors` channel; header request_id = a call id, unique per link
and direction) carry orjson metadata + raw little-endian array bytes:

    {"op": "prefill" | "decode", "step": int, "seqs": [u32...], "shape": [..], "dtype": "i32"|"f32"|"f16",
     "top_k": int}                                                      (origin → stage)
    {"op": "hidden", "step", "shape", "dtype"}                          (stage → origin: hidden states)
    {"op": "logits", "step", "shape", "dtype", "top_k": k}             (stage → origin: last stage)
    {"op": "error", "step", "code", "message"}                          (stage → origin, empty payload)

`top_k` > 0 asks the last stage for the k largest logits per row as k int32 ids then k float32 values
(2 KiB for k = 256 instead of 192 KiB for SmolLM2's full vocabulary); the origin rebuilds full rows with
-inf elsewhere, which is exact for greedy decoding and for top-k ≤ k sampling. `top_k` = 0 sends full rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mesh import protocol
from mesh.mesh_errors import ProtocolError
from mesh.protocol import TENSOR, BinaryFrame

STAGE_OPEN = "stage.open"
STAGE_CLOSE = "stage.close"
OFFLOAD_OPEN = "offload.open"
OFFLOAD_TOKEN = "offload.token"
OFFLOAD_DONE = "offload.done"
OFFLOAD_ERROR = "offload.error"
OFFLOAD_CANCEL = "offload.cancel"
OFFLOAD_INFO = "offload.info"
OFFLOAD_TOKENIZE = "offload.tokenize"

for _name, _limit in (
    (STAGE_OPEN, 4096),
    (STAGE_CLOSE, 512),
    (OFFLOAD_OPEN, 196_608),
    (OFFLOAD_TOKEN, 2048),
    (OFFLOAD_DONE, 4096),
    (OFFLOAD_ERROR, 2048),
    (OFFLOAD_CANCEL, 256),
    (OFFLOAD_INFO, 512),
    (OFFLOAD_TOKENIZE, 196_608),
):
    protocol.register_control_type(_name, _limit)

# Error codes (in error frames and RemoteError.code).
REFUSED = "refused"
"""The node does not serve others (policy), or is below its battery floor."""
NO_MODEL = "no_model"
BAD_REQUEST = "bad_request"
UNKNOWN_SEQUENCE = "unknown_sequence"
BAD_TENSOR = "bad_tensor"
BUSY = "busy"
INTERNAL = "internal"

DTYPES: dict[str, np.dtype] = {"i32": np.dtype("<i4"), "f32": np.dtype("<f4"), "f16": np.dtype("<f2")}
OPS_IN = ("prefill", "decode")
OPS_OUT = ("hidden", "logits", "error")
MAX_SEQS = 256
DEFAULT_TOP_K = 256
MAX_DIM = 1 << 24


class FrameError(Exception):
    """A tensor frame is malformed; `code` is one of the error codes above."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TensorMessage:
    call: int
    op: str
    step: int
    array: np.ndarray | None
    seqs: tuple[int, ...] = ()
    top_k: int = 0
    error: tuple[str, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def _dtype_name(array: np.ndarray) -> str:
    for name, dtype in DTYPES.items():
        if array.dtype == dtype or array.dtype == dtype.newbyteorder("="):
            return name
    raise ValueError(f"cannot send arrays of dtype {array.dtype}")


def encode_input(call: int, op: str, step: int, seqs: list[int], array: np.ndarray, top_k: int = 0,
                 fp16: bool = False) -> BinaryFrame:
    """Origin → stage: token ids (int32 [n]) or hidden states (float32 [n, hidden], sent as fp16 if asked)."""
    if op not in OPS_IN:
        raise ValueError(f"op must be one of {OPS_IN}")
    if fp16 and array.dtype == np.float32:
        array = array.astype("<f2")
    data = np.ascontiguousarray(array)
    meta = {"op": op, "step": step, "seqs": list(seqs), "shape": list(data.shape), "dtype": _dtype_name(data),
            "top_k": top_k}
    return BinaryFrame(TENSOR, call, meta, data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())


def encode_hidden(call: int, step: int, array: np.ndarray, fp16: bool = False) -> BinaryFrame:
    data = np.ascontiguousarray(array.astype("<f2") if fp16 else array.astype("<f4", copy=False))
    meta = {"op": "hidden", "step": step, "shape": list(data.shape), "dtype": _dtype_name(data)}
    return BinaryFrame(TENSOR, call, meta, data.tobytes())


def encode_logits(call: int, step: int, logits: np.ndarray, top_k: int) -> BinaryFrame:
    """Stage → origin: logits rows [b, vocab] (or [vocab]), whole or as the top-k (ids, values) per row."""
    rows = np.atleast_2d(np.asarray(logits, dtype=np.float32))
    vocab = rows.shape[1]
    if top_k <= 0 or top_k >= vocab:
        meta = {"op": "logits", "step": step, "shape": list(rows.shape), "dtype": "f32", "top_k": 0}
        return BinaryFrame(TENSOR, call, meta, rows.astype("<f4").tobytes())
    parts = []
    for row in rows:
        ids = top_k_ids(row, top_k)
        parts += [ids.astype("<i4").tobytes(), row[ids].astype("<f4").tobytes()]
    meta = {"op": "logits", "step": step, "shape": list(rows.shape), "dtype": "f32", "top_k": top_k}
    return BinaryFrame(TENSOR, call, meta, b"".join(parts))


TOP_K_BLOCK = 64


def top_k_ids(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of `row` (in no particular order), 0 < k < len(row); for k = 1 the
    argmax (the lowest index among ties, as `np.argmax` and greedy decoding pick).

    `np.argpartition` over SmolLM2's 49,152 logits takes ~0.5 ms; this takes ~0.07 ms: the k-th largest of
    the maxima of 64-value blocks is a lower bound on the row's k-th largest value (k blocks hold a value at
    least that large), so only the values above it — a few hundred — need partitioning."""
    if k == 1:
        return np.array([np.argmax(row)])
    n = row.shape[0] // TOP_K_BLOCK * TOP_K_BLOCK
    blocks = n // TOP_K_BLOCK
    if blocks <= k:
        return np.argpartition(-row, k - 1)[:k]
    maxima = row[:n].reshape(blocks, TOP_K_BLOCK).max(axis=1)
    bound = np.partition(maxima, blocks - k)[blocks - k]
    if not np.isfinite(bound):  # NaN or infinities about: the plain (slow) path
        return np.argpartition(-row, k - 1)[:k]
    candidates = np.flatnonzero(row >= bound)
    if candidates.shape[0] > k:
        candidates = candidates[np.argpartition(row[candidates], candidates.shape[0] - k)[-k:]]
    return candidates


def encode_error(call: int, step: int, code: str, message: str) -> BinaryFrame:
    meta = {"op": "error", "step": step, "code": code, "message": message[:500]}
    return BinaryFrame(TENSOR, call, meta, b"")


def _int(meta: dict[str, Any], key: str, low: int, high: int) -> int:
    value = meta.get(key)
    if type(value) is not int or not low <= value <= high:
        raise FrameError(BAD_TENSOR, f"tensor frame field {key!r} must be an integer in [{low}, {high}]")
    return value


def _array(meta: dict[str, Any], payload: bytes) -> np.ndarray:
    dtype = DTYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise FrameError(BAD_TENSOR, f"tensor dtype must be one of {sorted(DTYPES)}")
    shape = meta.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or any(type(d) is not int or not 0 < d <= MAX_DIM for d in shape)):
        raise FrameError(BAD_TENSOR, "tensor shape must be a list of 1 or 2 positive integers")
    count = int(np.prod(shape))
    if count * dtype.itemsize != len(payload):
        need = count * dtype.itemsize
        raise FrameError(BAD_TENSOR, f"tensor of shape {shape} {meta['dtype']} needs {need} bytes, "
                                     f"got {len(payload)}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def decode_input(frame: BinaryFrame) -> TensorMessage:
    """Validate an origin → stage frame (structure only; the stage checks shapes against its model)."""
    meta = frame.meta
    op = meta.get("op")
    if op not in OPS_IN:
        raise FrameError(BAD_TENSOR, f"tensor frame op must be one of {OPS_IN}")
    step = _int(meta, "step", 0, 2**31)
    top_k = _int(meta, "top_k", 0, 1 << 20)
    seqs = meta.get("seqs")
    if (not isinstance(seqs, list) or not 1 <= len(seqs) <= MAX_SEQS
            or any(type(s) is not int or not 0 <= s < 2**32 for s in seqs) or len(set(seqs)) != len(seqs)):
        raise FrameError(BAD_TENSOR, "tensor frame seqs must be 1-256 distinct u32 sequence ids")
    if op == "prefill" and len(seqs) != 1:
        raise FrameError(BAD_TENSOR, "prefill takes exactly one sequence")
    array = _array(meta, frame.payload)
    if op == "decode" and array.shape[0] != len(seqs):
        raise FrameError(BAD_TENSOR, f"decode of {len(seqs)} sequences got {array.shape[0]} rows")
    return TensorMessage(frame.request_id, op, step, array, tuple(seqs), top_k, meta=meta)


def decode_output(frame: BinaryFrame, vocab: int) -> TensorMessage:
    """Validate a stage → origin frame; logits come back as full float32 rows [b, vocab]."""
    meta = frame.meta
    op = meta.get("op")
    step = _int(meta, "step", 0, 2**31)
    if op == "error":
        code, message = meta.get("code"), meta.get("message")
        if not isinstance(code, str) or not isinstance(message, str):
            raise ProtocolError("error tensor frame lacks code/message")
        return TensorMessage(frame.request_id, op, step, None, error=(code[:64], message[:500]))
    if op == "hidden":
        array = _array(meta, frame.payload).astype(np.float32)
        return TensorMessage(frame.request_id, op, step, array)
    if op != "logits":
        raise ProtocolError(f"unexpected tensor frame op {op!r:.20}")
    top_k = _int(meta, "top_k", 0, vocab)
    shape = meta.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or shape[1] != vocab or type(shape[0]) is not int \
            or not 0 < shape[0] <= MAX_SEQS:
        raise ProtocolError(f"logits shape must be [rows, {vocab}]")
    if top_k == 0:
        return TensorMessage(frame.request_id, op, step, _array(meta, frame.payload).astype(np.float32))
    rows = shape[0]
    if len(frame.payload) != rows * top_k * 8:
        raise ProtocolError("top-k logits payload has the wrong size")
    out = np.full((rows, vocab), -np.inf, dtype=np.float32)
    raw = memoryview(frame.payload)
    for r in range(rows):
        base = r * top_k * 8
        ids = np.frombuffer(raw[base: base + 4 * top_k], dtype="<i4")
        values = np.frombuffer(raw[base + 4 * top_k: base + 8 * top_k], dtype="<f4")
        if ids.min() < 0 or ids.max() >= vocab:
            raise ProtocolError("top-k logits name a token outside the vocabulary")
        out[r, ids] = values
    return TensorMessage(frame.request_id, op, step, out, top_k=top_k)
