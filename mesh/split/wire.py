"""Wire messages of offload and split: control frame types and the tensor frames stages exchange.

Pure codecs over `mesh.protocol` (which owns framing, chunking and size limits); nothing here does I/O.

Control frames (registered with `mesh.protocol.register_control_type` on import):

- `stage.open` {model, span "a:b", seq, cid?, from?, next?} → reply {hidden, vocab, span, feed?, chained?}
  — host layers `span` of `model` for one sequence `seq` (a u32 the caller picks, unique per link); a node
  that does not hold the model fetches only that span's bytes by `cid` (IPFS ranged reads); refused with an
  error frame (codes below). A chain (`split.stage_chain`): `from` (a peer id) lets that peer feed the
  sequence `forward` frames, under the u32 `feed` the reply gives (the host's choice); `next` {peer, seq:
  that peer's `feed`} asks this node to pass its output for `chain`/`forward` frames on to that sequence
  over a direct tensor link of its own — `chained` says whether it could link to it.
- `stage.close` {seq} → reply {} or {receipt} — forget the sequence (idempotent); a node that keeps a ledger
  returns the sequence's usage receipt (kind `stage`, request `stage-<seq>`, tokens_in = rows prefilled,
  tokens_out = decode steps), which the origin checks, countersigns and sends back as `stage.receipt`
  {receipt} → reply {}.
- `offload.open` {model, prompt_ids, params} → reply {accepted} — run a whole request; then the serving side
  sends `offload.token` {rid, index, token, text} per token and one `offload.done` {rid, finish_reason,
  usage} or `offload.error` {rid, code, message}. `rid` is the `id` of the `offload.open` frame.
- `offload.cancel` {rid} — the origin gave up on the request; the server stops generating.
- `offload.token` carries `logprobs` {chosen, top: [...]} (each `[id, base64 bytes, logprob]`) when the
  request asked for them (`encode_logprobs` / `decode_logprobs`).
- `offload.done` carries `receipt` (`split.receipts`: usage signed by the server) when the server keeps a
  ledger; the origin checks it against what it saw (prompt tokens sent, token frames received), countersigns
  it and sends it back as `offload.receipt` {receipt} → reply {} (the server keeps only what it issued).
- `offload.info` {model} → reply {config (ModelConfig fields), vocab_size, context_length, sampling_defaults}
  and `offload.tokenize` {model, messages | text} → reply {ids}: what a node that does not hold a model needs
  to accept a request for it and offload it (its tokenizer and sampling defaults live with the model).
- `offload.embed` {model, inputs: [[token ids]...]} → reply {dim, vectors: [base64 little-endian float32]}:
  embeddings of a model this node does not hold, by a peer that does (`split.remote_embed`): at most
  `MAX_EMBED_INPUTS` inputs and `MAX_EMBED_IDS` ids per frame, and only as many inputs as fit one reply
  (`embed_batch`).
- `offload.token` names the stop string that ended the answer as `stop_index` (its place in the request's
  `params.stop`), so "which stop matched" survives an offload.

Tensor frames (binary kind `TENSOR` on the `tensors` channel, or records on a direct tensor link; header
request_id = a call id, unique per link and direction; no metadata) are a small fixed binary header + raw
little-endian array bytes — read with one `struct` call, no JSON on the per-token path:

    origin → stage: INPUT_HEAD  = op (1 prefill, 2 decode, 7 chain / 6 forward: a chain's step), dtype,
                                  reply dtype (hidden states come back as f32 or f16), ndim (1 or 2),
                                  step, rows, cols (1 when ndim is 1), top_k, n = number of sequences
                    then n × u32 sequence ids, then rows × cols values
    stage → origin: OUTPUT_HEAD = op (3 hidden, 4 logits, 5 error), dtype, ndim, 0, step, rows, cols, top_k,
                                  compute_us (the stage's compute time: the origin tells link from compute)
                    then the values; an error carries orjson {"code", "message"} instead

dtype: 1 int32, 2 float32, 3 float16. Token ids are int32 [n]; hidden states [n, hidden]; logits [rows,
vocab]. `top_k` > 0 asks the last stage for the k largest logits per row as k int32 ids then k float32
values (2 KiB for k = 256 instead of 192 KiB for SmolLM2's full vocabulary); the origin rebuilds full rows
with -inf elsewhere, which is exact for greedy decoding and for top-k ≤ k sampling. `top_k` = 0 sends full
rows.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from shoal.mesh.p2p import protocol
from shoal.mesh.p2p.errors import ProtocolError
from shoal.mesh.p2p.protocol import TENSOR, BinaryFrame
from shoal.models.requests import EventLogprobs, TokenLogprob
from shoal.models.sampling import MAX_TOP_LOGPROBS
from shoal.models.stage import ids_in_range

STAGE_OPEN = "stage.open"
STAGE_CLOSE = "stage.close"
OFFLOAD_OPEN = "offload.open"
OFFLOAD_TOKEN = "offload.token"
OFFLOAD_DONE = "offload.done"
OFFLOAD_ERROR = "offload.error"
OFFLOAD_CANCEL = "offload.cancel"
OFFLOAD_INFO = "offload.info"
OFFLOAD_TOKENIZE = "offload.tokenize"
OFFLOAD_RECEIPT = "offload.receipt"
OFFLOAD_EMBED = "offload.embed"
STAGE_RECEIPT = "stage.receipt"

for _name, _limit in (
    (STAGE_OPEN, 4096),
    (STAGE_CLOSE, 512),  # its reply (a `reply` frame, up to 64 KiB) may carry a receipt
    (OFFLOAD_OPEN, 262_144),  # 16,384 prompt ids and a 64,000-character grammar, even all quotes
    (OFFLOAD_TOKEN, 6144),  # with logprobs: up to 21 [id, bytes, logprob] entries
    (OFFLOAD_DONE, 8192),
    (OFFLOAD_ERROR, 2048),
    (OFFLOAD_CANCEL, 256),
    (OFFLOAD_INFO, 512),
    (OFFLOAD_TOKENIZE, 196_608),
    (OFFLOAD_EMBED, 196_608),  # up to MAX_EMBED_IDS ids
    (OFFLOAD_RECEIPT, 8192),
    (STAGE_RECEIPT, 8192),
):
    protocol.register_control_type(_name, _limit)

MAX_TOKEN_BYTES = 64
"""Longest token (in bytes) a logprob entry may carry."""
MAX_EMBED_INPUTS = 64
MAX_EMBED_IDS = 16_384
EMBED_REPLY_BYTES = 60_000
"""Room for vectors in one `offload.embed` reply (a `reply` frame holds 64 KiB)."""


def embed_batch(dim: int) -> int:
    """How many `dim`-wide vectors one `offload.embed` reply carries (0: not even one fits)."""
    per_vector = 4 * ((dim * 4 + 2) // 3) + 3  # base64 of float32s, quotes and a comma
    return min(MAX_EMBED_INPUTS, EMBED_REPLY_BYTES // per_vector)


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(value: Any, dim: int) -> np.ndarray:
    """One base64 float32 vector of `dim` finite values (ValueError otherwise: the sender misbehaves)."""
    if not isinstance(value, str) or len(value) != 4 * ((dim * 4 + 2) // 3):
        raise ValueError(f"an embedding is {dim} base64 float32 values")
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad embedding bytes: {exc}") from None
    vector = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if vector.shape != (dim,) or not np.isfinite(vector).all():
        raise ValueError(f"an embedding is {dim} finite float32 values")
    return vector


def encode_logprobs(found: EventLogprobs) -> dict[str, Any]:
    """An `offload.token`'s `logprobs`: each entry `[token id, base64 of its bytes, logprob]`."""

    def entry(t: TokenLogprob) -> list[Any]:
        logprob = t.logprob if math.isfinite(t.logprob) else -9999.0  # as OpenAI writes -inf
        return [t.token_id, base64.b64encode(t.bytes).decode("ascii"), logprob]

    return {"chosen": entry(found.chosen), "top": [entry(t) for t in found.top]}


def decode_logprobs(value: Any) -> EventLogprobs:
    """`encode_logprobs`'s output, checked (ValueError when malformed: the sender misbehaves)."""

    def entry(item: Any) -> TokenLogprob:
        if not isinstance(item, list) or len(item) != 3:
            raise ValueError("a logprob entry is [id, bytes, logprob]")
        token, raw, logprob = item
        if type(token) is not int or token < 0 or not isinstance(raw, str) or len(raw) > MAX_TOKEN_BYTES * 2:
            raise ValueError("a logprob entry needs a token id and its base64 bytes")
        if isinstance(logprob, bool) or not isinstance(logprob, int | float) or not logprob <= 0.0:
            raise ValueError("a logprob is a number <= 0")  # also refuses NaN
        data = base64.b64decode(raw, validate=True)
        return TokenLogprob(token, data.decode("utf-8", errors="replace"), data, float(logprob))

    if not isinstance(value, dict) or not isinstance(value.get("top", []), list):
        raise ValueError("logprobs must be {chosen, top}")
    top = value.get("top", [])
    if len(top) > MAX_TOP_LOGPROBS:
        raise ValueError(f"at most {MAX_TOP_LOGPROBS} top logprobs")
    try:
        return EventLogprobs(entry(value.get("chosen")), tuple(entry(t) for t in top))
    except binascii.Error as exc:
        raise ValueError(f"bad token bytes: {exc}") from None


# Error codes (in error frames and RemoteError.code).
REFUSED = "refused"
"""The node does not serve others (policy), or is below its battery floor."""
QUOTA = "quota"
"""The asking peer used its share of this node's tokens for the hour (`max_tokens_per_peer_per_hour`)."""
NO_MODEL = "no_model"
BAD_REQUEST = "bad_request"
UNKNOWN_SEQUENCE = "unknown_sequence"
BAD_TENSOR = "bad_tensor"
BUSY = "busy"
INTERNAL = "internal"
NEXT_LOST = "next_lost"
"""A chained stage could not pass its output on to the next stage (its link to it failed)."""

DTYPES: dict[int, np.dtype] = {1: np.dtype("<i4"), 2: np.dtype("<f4"), 3: np.dtype("<f2")}
I32, F32, F16 = 1, 2, 3
OPS_IN = {"prefill": 1, "decode": 2, "forward": 6, "chain": 7}
"""A chain's decode step (`split.stage_chain`): `chain` from the origin to the chain's first stage, `forward`
from a stage to the next (it names the sequences by their `feed` ids there). A stage passes its output on to
the next stage of the sequence, or (the chain's last) answers the sequence's origin. The two ops keep the ids
apart: a `forward` frame names fed sequences only, every other frame the sender's own."""
CHAIN_OPS = ("chain", "forward")
"""A chain's step: from the origin, or passed on by the stage before."""
OPS_OUT = {"hidden": 3, "logits": 4, "error": 5}
OP_NAMES = {code: name for name, code in (OPS_IN | OPS_OUT).items()}
INPUT_HEAD = struct.Struct("<BBBBIIIIH")
OUTPUT_HEAD = struct.Struct("<BBBBIIIII")
MICROS_AT = OUTPUT_HEAD.size - 4
"""Where OUTPUT_HEAD keeps the stage's compute time (µs)."""
ONE_SEQ = struct.Struct("<I")
"""A decode step's one sequence id (the common case: no format string to build)."""
MAX_SEQS = 256
DEFAULT_TOP_K = 256
MAX_TOP_K = 1 << 20
MAX_STEP = 2**31
MAX_DIM = 1 << 24


class FrameError(Exception):
    """A tensor frame is malformed; `code` is one of the error codes above."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class TensorMessage:
    """A decoded tensor frame. (Not frozen: a frozen dataclass's __init__ sets each field through
    object.__setattr__, ~20 µs for these with cold caches — on every call.)"""

    call: int
    op: str
    step: int
    array: np.ndarray | None
    seqs: tuple[int, ...] = ()
    top_k: int = 0
    reply_f16: bool = False
    """(input) Send hidden states back as float16."""
    compute_s: float = 0.0
    """(output) The stage's compute time for the call."""
    error: tuple[str, str] | None = None
    top_ids: np.ndarray | None = None
    """(output, top-k logits) int32 [rows, k]: each row's k best token ids (`expand_top_k`: full rows)."""
    top_values: np.ndarray | None = None
    """(output, top-k logits) float32 [rows, k]: their logits."""


_CODES = {("i", 4): I32, ("f", 4): F32, ("f", 2): F16}  # (kind, size): any byte order


def _dtype_code(array: np.ndarray) -> int:
    code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ValueError(f"cannot send arrays of dtype {array.dtype}")
    return code


def _shape(array: np.ndarray) -> tuple[int, int, int]:
    """(ndim, rows, cols) of a 1-D or 2-D array."""
    if array.ndim == 1:
        return 1, array.shape[0], 1
    if array.ndim == 2:
        return 2, array.shape[0], array.shape[1]
    raise ValueError(f"tensor frames carry 1-D or 2-D arrays, not shape {array.shape}")


def encode_input(call: int, op: str, step: int, seqs: list[int], array: np.ndarray, top_k: int = 0,
                 fp16: bool = False) -> BinaryFrame:
    """Origin → stage: token ids (int32 [n]) or hidden states (float32 [n, hidden]). `fp16` sends hidden
    states as float16 and asks for float16 hidden states back."""
    if fp16 and array.dtype == np.float32:
        array = array.astype("<f2")
    head = input_head(op, step, seqs, array, top_k, fp16)
    return BinaryFrame(TENSOR, call, {}, head + _data(array, head[1]))


def input_head(op: str, step: int, seqs: list[int], array: np.ndarray, top_k: int = 0, fp16: bool = False
               ) -> bytes:
    """An input frame's header and sequence ids, for `array` as it goes on the wire (its dtype byte, the
    second, is the array's)."""
    code = OPS_IN.get(op)
    if code is None:
        raise ValueError(f"op must be one of {sorted(OPS_IN)}")
    if not 1 <= len(seqs) <= MAX_SEQS or not 0 <= top_k <= MAX_TOP_K or not 0 <= step <= MAX_STEP:
        raise ValueError("tensor frame fields out of bounds")
    dtype = _dtype_code(array)
    ndim, rows, cols = _shape(array)
    try:
        ids = ONE_SEQ.pack(seqs[0]) if len(seqs) == 1 else struct.pack(f"<{len(seqs)}I", *seqs)
    except struct.error:
        raise ValueError("sequence ids must be u32") from None
    return INPUT_HEAD.pack(code, dtype, F16 if fp16 else F32, ndim, step, rows, cols, top_k, len(seqs)) + ids


def _data(array: np.ndarray, dtype: int) -> bytes:
    """The array's bytes in the wire's layout (C order, little-endian): tobytes() at once where it is that
    already (a decode step's output), else through a converted copy."""
    if array.dtype == DTYPES[dtype] and array.flags.c_contiguous:
        return array.tobytes()
    return np.ascontiguousarray(array, dtype=DTYPES[dtype]).tobytes()


def micros(seconds: float) -> int:
    """A compute time as OUTPUT_HEAD's u32 of microseconds."""
    return min(max(int(seconds * 1e6), 0), 2**32 - 1)


def encode_hidden(call: int, step: int, array: np.ndarray, fp16: bool = False,
                  compute_s: float = 0.0) -> BinaryFrame:
    code = F16 if fp16 else F32
    return BinaryFrame(TENSOR, call, {}, hidden_head(step, array, fp16, compute_s) + _data(array, code))


def hidden_head(step: int, array: np.ndarray, fp16: bool = False, compute_s: float = 0.0) -> bytes:
    ndim, rows, cols = _shape(array)
    return OUTPUT_HEAD.pack(OPS_OUT["hidden"], F16 if fp16 else F32, ndim, 0, step, rows, cols, 0,
                            micros(compute_s))


def logits_head(step: int, rows: int, vocab: int, top_k: int, compute_s: float = 0.0) -> bytes:
    """(`top_k` 0: full rows.)"""
    return OUTPUT_HEAD.pack(OPS_OUT["logits"], F32, 2, 0, step, rows, vocab, top_k, micros(compute_s))


def argmax_message(call: int, token: int, compute_us: int) -> TensorMessage:
    """The message `decode_output` makes of a one-row greedy answer (`encode_logits` with top_k 1), from its
    values (the native step lane's read of it; its step is the call's id, as the origin numbers both)."""
    return TensorMessage(call, "logits", call, None, top_k=1, compute_s=compute_us / 1e6,
                         top_ids=np.array([[token]], dtype=np.int32))


TOP_1 = struct.Struct("<if")


def encode_logits(call: int, step: int, logits: np.ndarray, top_k: int,
                  compute_s: float = 0.0) -> BinaryFrame:
    """Stage → origin: logits rows [b, vocab] (or [vocab]), whole or as the top-k (ids, values) per row."""
    rows = logits if logits.ndim == 2 else logits.reshape(1, -1)
    count, vocab = rows.shape
    if top_k <= 0 or top_k >= vocab:
        top_k, payload = 0, np.ascontiguousarray(rows, dtype=DTYPES[F32]).tobytes()
    elif top_k == 1 and count == 1:  # one greedy decode step: its argmax (the lowest id among ties)
        best = int(rows[0].argmax())
        payload = TOP_1.pack(best, rows[0, best])
    elif top_k == 1:  # greedy decoding: each row's argmax, one struct pack each
        payload = b"".join(TOP_1.pack(i, rows[r, i]) for r, i in enumerate(rows.argmax(axis=1).tolist()))
    else:
        parts = []
        for row in rows:
            ids = top_k_ids(row, top_k)
            parts += [ids.astype("<i4").tobytes(), row[ids].astype("<f4").tobytes()]
        payload = b"".join(parts)
    return BinaryFrame(TENSOR, call, {}, logits_head(step, count, vocab, top_k, compute_s) + payload)


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
    head = OUTPUT_HEAD.pack(OPS_OUT["error"], 0, 0, 0, min(max(step, 0), MAX_STEP), 0, 0, 0, 0)
    return BinaryFrame(TENSOR, call, {}, head + orjson.dumps({"code": code, "message": message[:500]}))


def _array(payload: bytes, offset: int, dtype_code: int, ndim: int, rows: int, cols: int) -> np.ndarray:
    dtype = DTYPES.get(dtype_code)
    if dtype is None:
        raise FrameError(BAD_TENSOR, "tensor dtype must be int32, float32 or float16")
    if ndim not in (1, 2) or not 0 < rows <= MAX_DIM or not 0 < cols <= MAX_DIM or (ndim == 1 and cols != 1):
        raise FrameError(BAD_TENSOR, "tensor shape must be 1 or 2 positive dimensions")
    count = rows * cols
    if count * dtype.itemsize != len(payload) - offset:
        raise FrameError(BAD_TENSOR, f"tensor of shape {[rows, cols][:ndim]} needs {count * dtype.itemsize} "
                                     f"bytes, got {len(payload) - offset}")
    # one constructor: a read-only view of the payload in its final shape (frombuffer + reshape make two)
    return np.ndarray((rows, cols) if ndim == 2 else (rows,), dtype, payload, offset)


def frame_step(frame: BinaryFrame) -> int:
    """The step a tensor frame names, or 0 if it has no readable header (for an error reply)."""
    if len(frame.payload) < 8:
        return 0
    step = int.from_bytes(frame.payload[4:8], "little")
    return step if step <= MAX_STEP else 0


def decode_input(frame: BinaryFrame) -> TensorMessage:
    """Validate an origin → stage frame (structure only; the stage checks shapes against its model)."""
    payload = frame.payload
    if len(payload) < INPUT_HEAD.size:
        raise FrameError(BAD_TENSOR, "tensor frame is shorter than its header")
    op, dtype, reply, ndim, step, rows, cols, top_k, count = INPUT_HEAD.unpack_from(payload)
    name = OP_NAMES.get(op)
    if name not in OPS_IN:
        raise FrameError(BAD_TENSOR, f"tensor frame op must be one of {sorted(OPS_IN)}")
    if step > MAX_STEP or top_k > MAX_TOP_K or reply not in (F32, F16):
        raise FrameError(BAD_TENSOR, "tensor frame step, top_k or reply dtype out of bounds")
    offset = INPUT_HEAD.size + 4 * count
    if not 1 <= count <= MAX_SEQS or len(payload) < offset:
        raise FrameError(BAD_TENSOR, "tensor frame seqs must be 1-256 distinct u32 sequence ids")
    if count == 1:
        seqs = ONE_SEQ.unpack_from(payload, INPUT_HEAD.size)
    else:
        seqs = struct.unpack_from(f"<{count}I", payload, INPUT_HEAD.size)
        if len(set(seqs)) != count:
            raise FrameError(BAD_TENSOR, "tensor frame seqs must be 1-256 distinct u32 sequence ids")
    if name == "prefill" and count != 1:
        raise FrameError(BAD_TENSOR, "prefill takes exactly one sequence")
    array = _array(payload, offset, dtype, ndim, rows, cols)
    if name != "prefill" and rows != count:
        raise FrameError(BAD_TENSOR, f"decode of {count} sequences got {rows} rows")
    return TensorMessage(frame.request_id, name, step, array, seqs, top_k, reply_f16=reply == F16)


def decode_output(frame: BinaryFrame, vocab: int) -> TensorMessage:
    """Validate a stage → origin frame: hidden states or full logits rows in `array`, top-k logits in
    `top_ids`/`top_values`. Raises ProtocolError (the stage broke the format)."""
    payload = frame.payload
    if len(payload) < OUTPUT_HEAD.size:
        raise ProtocolError("tensor reply is shorter than its header")
    op, dtype, ndim, _, step, rows, cols, top_k, compute_us = OUTPUT_HEAD.unpack_from(payload)
    name = OP_NAMES.get(op)
    compute_s = compute_us / 1e6
    if name == "error":
        try:
            body = orjson.loads(payload[OUTPUT_HEAD.size:])
            code, message = body["code"], body["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise ProtocolError("error tensor frame lacks code/message") from None
        if not isinstance(code, str) or not isinstance(message, str):
            raise ProtocolError("error tensor frame lacks code/message")
        return TensorMessage(frame.request_id, name, step, None, error=(code[:64], message[:500]))
    if name == "hidden":
        try:
            array = _array(payload, OUTPUT_HEAD.size, dtype, ndim, rows, cols)
        except FrameError as exc:
            raise ProtocolError(exc.message) from None
        return TensorMessage(frame.request_id, name, step, array.astype(np.float32), compute_s=compute_s)
    if name != "logits":
        raise ProtocolError(f"unexpected tensor reply op {op}")
    if ndim != 2 or cols != vocab or dtype != F32 or not 0 < rows <= MAX_SEQS or top_k > vocab:
        raise ProtocolError(f"logits must be float32 [rows, {vocab}]")
    if top_k == 0:
        try:
            array = _array(payload, OUTPUT_HEAD.size, dtype, ndim, rows, cols)
        except FrameError as exc:
            raise ProtocolError(exc.message) from None
        return TensorMessage(frame.request_id, name, step, array, compute_s=compute_s)
    if len(payload) != OUTPUT_HEAD.size + rows * top_k * 8:
        raise ProtocolError("top-k logits payload has the wrong size")
    pairs = np.frombuffer(payload, dtype="<i4", offset=OUTPUT_HEAD.size).reshape(rows, 2, top_k)
    ids, values = pairs[:, 0], pairs[:, 1].view("<f4")
    if not ids_in_range(ids, vocab):
        raise ProtocolError("top-k logits name a token outside the vocabulary")
    return TensorMessage(frame.request_id, name, step, None, top_k=top_k, compute_s=compute_s,
                         top_ids=ids, top_values=values)


def expand_top_k(ids: np.ndarray, values: np.ndarray, vocab: int) -> np.ndarray:
    """Full float32 logits rows [rows, vocab] from top-k replies: `values` at `ids`, -inf elsewhere."""
    out = np.full((ids.shape[0], vocab), -np.inf, dtype=np.float32)
    np.put_along_axis(out, ids, values, axis=1)
    return out
