"""Direct tensor links: a split's tensor frames over a sealed TCP connection when the stage's node is directly
reachable — the `tensors` channel's fast path, as a peer's HTTP gateway is the `blocks` channel's.

Why: a decode step of a split sends a few KiB each way. Through aiortc's pure-Python SCTP/DTLS each of those
calls costs ~1.8 ms on this hardware (four packets, four thread hand-offs through two event loops) against
~3 ms of compute per stage. Over a TCP socket read and written by the threads that compute — the origin's
engine thread and the stage node's worker — a call costs two socket writes and two wake-ups.

Who may use it: only a linked peer. The origin asks for a link with a `tensor.link` control frame — over the
WebRTC control channel, so the peer has proved membership and the reply is DTLS-encrypted — and the stage node
answers {"port", "token", "key"}: a one-use 16-byte token (valid `[split] link_token_ttl_s`) and a fresh
AES-256-GCM key. The origin connects to the host of the peer's API address (where its gateway is), sends the
token, and waits for a sealed empty record that says the node took it. A node that binds its API to loopback
listens on loopback only, so the link is used exactly where the gateway is reachable, and the data channel
otherwise.

Records (both directions): `u32 LE length` + AES-GCM(key, nonce, plaintext), nonce = u32 direction (0 origin
→ stage, 1 back) + u64 counter, so a record cannot be replayed, reordered or reflected. Plaintext: `u32
request id` + the tensor frame's payload (`mesh.split_wire`'s binary header and array) — the same frame, with
the same limits, as on the data channel (`mesh.split_wire` decodes both alike). A record that fails
its tag or breaks the bounds closes the link; a frame whose content is wrong gets an error frame, as on the
channel. One call is in flight per origin link: the origin sends a record only once the last one was
answered (bytes past a record break the link at the origin's end), so a decode record is read whole with
one `recv`. A stage node reads records back to back (`RecordStream`): a chain's stage passes each step on as
it has it, over one link for all its chained sequences (`split.stage_chain`), and the origin waits for the
chain's answer on the last stage's link (`call_chain`).

An offload's tokens use the same grant, handshake and `Sealer` on a link of their own (`split.offload_link`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from shoal.mesh.p2p import protocol
from shoal.mesh.p2p.errors import MeshError
from shoal.mesh.p2p.protocol import BINARY_KINDS, MAX_REQUEST_ID, TENSOR, BinaryFrame
from shoal.mesh.split.arrival import Arrivals, wait_readable
from shoal.mesh.split.config import SplitConfig

logger = logging.getLogger(__name__)

TENSOR_LINK = "tensor.link"
"""Control frame: {} → {"port", "token", "key"} (hex), or an error reply (refused, unavailable)."""
protocol.register_control_type(TENSOR_LINK, 256)
TOKEN_BYTES = 16
TAG_BYTES = 16
LENGTH = struct.Struct("<I")
FRAME_HEAD = struct.Struct("<I")
NONCE = struct.Struct("<IQ")
"""A record's AES-GCM nonce: direction, counter."""
MAX_PLAINTEXT = FRAME_HEAD.size + BINARY_KINDS[TENSOR][2]
MAX_RECORD = MAX_PLAINTEXT + TAG_BYTES
TO_STAGE, TO_ORIGIN = 0, 1


class LinkError(MeshError):
    """The direct link failed: closed, timed out, or a record that does not open (the link is dropped)."""


class LinkIdle(LinkError):
    """No record began within the socket's timeout (the link itself may be fine)."""


# --- records (pure) ---------------------------------------------------------------------------------------

def encode_frame(frame: BinaryFrame) -> bytes:
    """A tensor frame's plaintext; raises ValueError past the channel's limits."""
    if frame.kind != TENSOR or frame.meta:
        raise ValueError("a tensor link carries tensor frames (no metadata) only")
    if not 0 <= frame.request_id <= MAX_REQUEST_ID:
        raise ValueError("tensor frame request id out of bounds")
    if len(frame.payload) > BINARY_KINDS[TENSOR][2]:
        raise ValueError(f"tensor payload of {len(frame.payload)} bytes exceeds {BINARY_KINDS[TENSOR][2]}")
    return FRAME_HEAD.pack(frame.request_id) + frame.payload


def decode_frame(plaintext: bytes) -> BinaryFrame:
    """The frame in a record's plaintext; raises LinkError if it is not one (the peer broke the format)."""
    if len(plaintext) < FRAME_HEAD.size:
        raise LinkError("tensor record shorter than its header")
    (request_id,) = FRAME_HEAD.unpack_from(plaintext)
    return BinaryFrame(TENSOR, request_id, {}, plaintext[FRAME_HEAD.size :])


class Sealer:
    """AES-256-GCM for one end of a link: seals records it sends, opens records it receives, each direction
    with its own counter."""

    def __init__(self, key: bytes, sends: int) -> None:
        if len(key) != 32:
            raise ValueError("a tensor link key has 32 bytes")
        self._aead = AESGCM(key)
        self._key = key
        self._native: Any = None
        """The native step lane's contexts for this key (`native_keys`), made on first use."""
        self._sends, self._receives = sends, 1 - sends
        self._sent = 0
        self._received = 0

    @staticmethod
    def _nonce(direction: int, counter: int) -> bytes:
        return NONCE.pack(direction, counter)

    def seal(self, plaintext: bytes) -> bytes:
        """`u32 length` + sealed record."""
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError(f"record of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT}")
        sealed = self._aead.encrypt(self._nonce(self._sends, self._sent), plaintext, None)
        self._sent += 1
        return LENGTH.pack(len(sealed)) + sealed

    def open(self, sealed: bytes) -> bytes:
        try:
            plaintext = self._aead.decrypt(self._nonce(self._receives, self._received), sealed, None)
        except InvalidTag:
            raise LinkError("a tensor record failed authentication") from None
        self._received += 1
        return plaintext

    # The native step lane (`split.step_lane`): the same records, sealed and opened in C, counters kept here.

    def native_keys(self, lane: ModuleType) -> Any:
        if self._native is None:
            self._native = lane.keys(self._key)
        return self._native

    def take_native(self, lane: ModuleType, sock: socket.socket, head: bytes, inputs: np.ndarray
                    ) -> int | tuple[int, bytes]:
        """`lane.take`: a steady step (request id << 32 | step) or what the generic reader must take over;
        the receive counter counts every record that opened."""
        got = lane.take(sock.fileno(), self.native_keys(lane), self._receives, self._received, head, inputs)
        if type(got) is int or got[0] == lane.OPENED:
            self._received += 1
        return got

    def send_native(self, lane: ModuleType, sock: socket.socket, request_id: int, head: bytes, step: int,
                    micros: int, values: np.ndarray, *, top_1: bool = False, micros_at: int = -1,
                    closed_check: bool = False, timeout_s: float = SplitConfig.link_record_timeout_s) -> None:
        """`lane.send`: seal and send a steady step's answer (its head as `head`, with `step` and, at
        `micros_at`, the compute time filled in); raises LinkError."""
        result = lane.send(sock.fileno(), self.native_keys(lane), self._sends, self._sent, request_id, head,
                           step, micros_at, micros, top_1, values, closed_check, int(timeout_s * 1000))
        if result == lane.CLOSED:
            raise LinkError("the peer closed the link")
        self._sent += 1
        if result == lane.TIMED_OUT:
            raise LinkError("tensor link timed out")
        if result < 0:
            raise LinkError(f"tensor link failed: {os.strerror(-result)}")

    def answer_native(self, lane: ModuleType, sock: socket.socket, call: NativeCall) -> int | None:
        """`lane.answer`: the argmax answer to `call` (token id << 32 | compute µs) when it is the record
        waiting on the socket, else None with the socket untouched."""
        got = lane.answer(sock.fileno(), self.native_keys(lane), self._receives, self._received,
                          call.answer_head, call.request_id, call.vocab)
        if got is not None:
            self._received += 1
        return got


@dataclass(slots=True)
class NativeCall:
    """A steady greedy decode call through the native step lane (`split.step_lane`), in place of its frame:
    the frame's header (`wire.input_head`, the step filled in natively) and values; the answer expected is the
    argmax of one logits row (`wire.logits_head(0, 1, vocab, 1)`). Whatever else comes back is read the
    generic way."""

    lane: ModuleType
    request_id: int
    head: bytes
    step: int
    values: np.ndarray
    answer_head: bytes
    vocab: int

    def send(self, sealer: Sealer, sock: socket.socket, timeout_s: float) -> None:
        sealer.send_native(self.lane, sock, self.request_id, self.head, self.step, 0, self.values,
                           timeout_s=timeout_s)


Request = BinaryFrame | NativeCall
Answer = BinaryFrame | int
"""A call's answer: the frame, or (a `NativeCall` answered as expected) its token id << 32 | compute µs."""


# --- sockets ----------------------------------------------------------------------------------------------

def recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise LinkError("the tensor link closed")
        got += n
    return bytes(buffer)


FIRST_READ = 65_536
"""The first read of a record takes up to this much: a decode step's record arrives whole in one read."""


def read_record(sock: socket.socket, sealer: Sealer,
                record_timeout_s: float = SplitConfig.link_record_timeout_s) -> bytes:
    """One record's plaintext. The socket's timeout bounds the wait for the first bytes (`LinkIdle` when it
    passes); the rest of a long record must follow within `record_timeout_s` (the sender writes it at once).
    One call is in flight per link, so nothing may follow a record until it is answered: bytes past it break
    the link."""
    try:
        try:
            data = sock.recv(FIRST_READ)
        except TimeoutError:
            raise LinkIdle("no record within the wait") from None
        if not data:
            raise LinkError("the tensor link closed")
        wait = sock.gettimeout()
        if len(data) < LENGTH.size:  # the length itself in pieces: rare
            sock.settimeout(record_timeout_s)
            data += recv_exact(sock, LENGTH.size - len(data))
            sock.settimeout(wait)
        (size,) = LENGTH.unpack_from(data)
        if not TAG_BYTES <= size <= MAX_RECORD:
            raise LinkError(f"tensor record of {size} bytes is out of bounds")
        have = len(data) - LENGTH.size
        if have > size:
            raise LinkError("bytes past a tensor record before it was answered")
        if have < size:  # a long record (prefill): read the rest
            sock.settimeout(record_timeout_s)
            data += recv_exact(sock, size - have)
            sock.settimeout(wait)
        return sealer.open(data[LENGTH.size:])
    except TimeoutError:
        raise LinkError("tensor link timed out") from None
    except OSError as exc:
        raise LinkError(f"tensor link failed: {exc}") from None


def split_record(data: bytes | bytearray) -> int | None:
    """The size of the whole record (length prefix included) that `data` starts with, or None while more
    bytes are needed; raises LinkError on a length out of bounds."""
    if len(data) < LENGTH.size:
        return None
    (size,) = LENGTH.unpack_from(data)
    if not TAG_BYTES <= size <= MAX_RECORD:
        raise LinkError(f"tensor record of {size} bytes is out of bounds")
    return LENGTH.size + size if len(data) >= LENGTH.size + size else None


class RecordStream:
    """A stage node's reading end: records back to back, bytes past one kept for the next. (An upstream
    stage of a chain sends a step as soon as it has one: the next may already be behind it.) The socket's own
    timeout bounds each wait for more of a record."""

    def __init__(self, sock: socket.socket, sealer: Sealer) -> None:
        self._sock = sock
        self._sealer = sealer
        self._data = bytearray()
        self._opened: bytes | None = None
        """A record the native lane opened but left to `read` (not a steady step)."""

    def buffered(self) -> bool:
        """A whole record — or bytes that cannot start one — is waiting here: `read` it without waiting on
        the socket (it raises for the latter). Never raises itself (the stage worker calls it between
        records)."""
        if self._opened is not None:
            return True
        try:
            return split_record(self._data) is not None
        except LinkError:
            return True

    def take_step(self, lane: ModuleType, head: bytes, inputs: np.ndarray) -> int | None:
        """The native lane's read (`split.step_lane`): (request id << 32 | step) when the next record is
        the steady step `head` describes, its values in `inputs`; None when it is anything else (or bytes
        are kept here already), which `read` then returns as ever."""
        if self._data or self._opened is not None:
            return None
        got = self._sealer.take_native(lane, self._sock, head, inputs)
        if type(got) is int:
            return got
        kind, data = got
        if kind == lane.OPENED:
            self._opened = data
        else:
            self._data += data
        return None

    def read(self) -> bytes:
        """The next record's plaintext; raises LinkError."""
        if self._opened is not None:
            plaintext, self._opened = self._opened, None
            return plaintext
        try:
            while (size := split_record(self._data)) is None:
                chunk = self._sock.recv(FIRST_READ)
                if not chunk:
                    raise LinkError("the tensor link closed")
                self._data += chunk
        except TimeoutError:
            raise LinkError("tensor link timed out") from None
        except OSError as exc:
            raise LinkError(f"tensor link failed: {exc}") from None
        sealed = bytes(self._data[LENGTH.size:size])
        del self._data[:size]
        return self._sealer.open(sealed)


def shutdown_socket(sock: socket.socket) -> None:
    """End a connection from any thread (a blocked read returns), ignoring one that is gone already."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- the origin's end -------------------------------------------------------------------------------------

def handshake(host: str, grant: dict, timeout_s: float = SplitConfig.link_handshake_timeout_s,
              record_timeout_s: float = SplitConfig.link_record_timeout_s) -> tuple[socket.socket, Sealer]:
    """Blocking: connect to `host` with a `tensor.link` grant and show its token within `timeout_s`; the
    connected socket (the node has taken the token: its sealed empty record was read) and the origin's
    `Sealer`, past that record. Raises LinkError (the caller keeps the data channel)."""
    try:
        port, token, key = int(grant["port"]), bytes.fromhex(grant["token"]), bytes.fromhex(grant["key"])
    except (KeyError, TypeError, ValueError):
        raise LinkError(f"bad tensor link grant {str(grant)[:80]}") from None
    if not 0 < port < 65536 or len(token) != TOKEN_BYTES or len(key) != 32:
        raise LinkError("bad tensor link grant")
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise LinkError(f"cannot reach {host}:{port}: {exc}") from None
    sealer = Sealer(key, TO_STAGE)
    try:
        tune_socket(sock)
        sock.sendall(token)
        if read_record(sock, sealer, record_timeout_s) != b"":
            raise LinkError("the node answered the handshake with data")
    except (LinkError, OSError) as exc:
        shutdown_socket(sock)
        sock.close()
        raise LinkError(f"tensor link handshake with {host}:{port} failed: {exc}") from None
    return sock, sealer


class TensorLinkClient:
    """The origin's end: blocking `call()`s from one thread at a time (the engine's); `close()` from any (a
    call in flight then fails at once and releases the socket itself)."""

    def __init__(self, sock: socket.socket, key: bytes | Sealer,
                 record_timeout_s: float = SplitConfig.link_record_timeout_s,
                 spin_s: float = SplitConfig.link_spin_us / 1e6) -> None:
        """`key`: the link's key, or the origin's `Sealer` as the handshake left it. `spin_s`: how long a
        decode call may poll for its answer around when it is due (`split.arrival`; 0: never)."""
        self._sock = sock
        self._sealer = key if isinstance(key, Sealer) else Sealer(key, TO_STAGE)
        self._record_timeout = record_timeout_s
        self._arrivals = Arrivals(spin_s)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(cls, host: str, grant: dict, timeout_s: float = SplitConfig.link_handshake_timeout_s,
                record_timeout_s: float = SplitConfig.link_record_timeout_s,
                spin_s: float = SplitConfig.link_spin_us / 1e6) -> TensorLinkClient:
        """Connect with a `tensor.link` grant within `timeout_s`; raises LinkError (the caller keeps the data
        channel)."""
        sock, sealer = handshake(host, grant, timeout_s, record_timeout_s)
        return cls(sock, sealer, record_timeout_s, spin_s)

    def call(self, frame: Request, timeout_s: float, alive: Callable[[], bool] = lambda: True,
             poll_s: float = SplitConfig.link_alive_poll_s, sent: Callable[[], None] | None = None
             ) -> Answer:
        """Send one tensor frame (or a `NativeCall`) and wait for the frame answering it (same request id).
        Polls `alive` (the WebRTC link's state) while waiting, so a peer the mesh declared dead fails the call
        at once. `sent()` runs once the frame is sent, before the wait (the caller's deferred work:
        `models.idle`)."""
        with self._lock:
            if self._closed:
                raise LinkError("the tensor link is closed")
            deadline = time.monotonic() + timeout_s
            native = frame if type(frame) is NativeCall else None
            try:
                if native is not None:
                    decode = True
                    native.send(self._sealer, self._sock, self._record_timeout)
                else:
                    record = self._sealer.seal(encode_frame(frame))
                    # a decode record fits the socket's buffer at once; a long prefill one may take a while
                    decode = len(record) <= FIRST_READ
                    self._set_timeout(poll_s if decode else self._record_timeout)
                    self._sock.sendall(record)
                sent_at = time.perf_counter()
                if sent is not None:
                    sent()
                window = self._arrivals.window() if decode else None
                if window is not None:
                    wait_readable((self._sock,), sent_at, window)  # the answer is read below, as ever
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise LinkError(f"no answer within {timeout_s:.0f} s")
                    if not alive():
                        raise LinkError("the peer's link went down")
                    if native is not None:
                        if not select.select([self._sock], [], [], min(poll_s, remaining))[0]:
                            continue
                        answer = self._sealer.answer_native(native.lane, self._sock, native)
                        if answer is not None:
                            self._arrivals.observe(time.perf_counter() - sent_at)
                            return answer
                    self._set_timeout(min(poll_s, remaining))
                    try:
                        plaintext = read_record(self._sock, self._sealer, self._record_timeout)
                    except LinkIdle:
                        continue
                    break
                if decode:
                    self._arrivals.observe(time.perf_counter() - sent_at)
                reply = decode_frame(plaintext)
            except (LinkError, ValueError, OSError) as exc:
                self._release()
                raise LinkError(str(exc)) from None
            if reply.request_id != frame.request_id:
                self._release()
                raise LinkError(f"answer to call {reply.request_id}, expected {frame.request_id}")
            return reply

    def usable_one_way(self) -> bool:
        """Whether this link, used one way (`send`: nothing ever comes back), is still open: its socket turns
        readable once the peer closed it — which a send would not notice (it succeeds once, into the void).
        A link the peer closed is released. Never waits (the event loop calls it): while the worker is
        sending on the link, the link is in use, and that send finds out for itself."""
        if not self._lock.acquire(blocking=False):
            return not self._closed
        try:
            if not self._closed and select.select([self._sock], [], [], 0)[0]:
                self._release()
            return not self._closed
        finally:
            self._lock.release()

    def send_native(self, lane: ModuleType, request_id: int, head: bytes, step: int, values: np.ndarray
                    ) -> None:
        """`send` of a steady chain step through the native lane (`split.step_lane`): the same checks, the
        same record. Raises LinkError (the link is then closed)."""
        with self._lock:
            if self._closed:
                raise LinkError("the tensor link is closed")
            try:
                self._sealer.send_native(lane, self._sock, request_id, head, step, 0, values,
                                         closed_check=True, timeout_s=self._record_timeout)
            except LinkError as exc:
                self._release()
                raise LinkError(f"sending on the tensor link failed: {exc}") from None

    def send(self, frame: BinaryFrame) -> None:
        """One-way: a frame answered elsewhere — a chained stage passing its output to the next stage, whose
        answer goes to the origin (`split.stage_chain`). Raises LinkError (the link is then closed)."""
        with self._lock:
            if self._closed:
                raise LinkError("the tensor link is closed")
            try:
                if select.select([self._sock], [], [], 0)[0]:  # see `usable_one_way`
                    raise LinkError("the peer closed the link")
                self._set_timeout(self._record_timeout)
                self._sock.sendall(self._sealer.seal(encode_frame(frame)))
            except (LinkError, ValueError, OSError) as exc:
                self._release()
                raise LinkError(f"sending on the tensor link failed: {exc}") from None

    def _set_timeout(self, seconds: float) -> None:
        if seconds != self._sock.gettimeout():  # settimeout is a system call; gettimeout is not
            self._sock.settimeout(seconds)

    def _release(self) -> None:
        """With the lock held (or nothing else using the socket): end the link and free the socket."""
        self._closed = True
        shutdown_socket(self._sock)
        self._sock.close()

    def close(self) -> None:
        """Idempotent. Ends the link at once; the socket is freed here, or by the call in flight."""
        if self._lock.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._lock.release()
            return
        self._closed = True
        shutdown_socket(self._sock)  # wakes the waiting call, which then releases the socket


# --- a chain's step ---------------------------------------------------------------------------------------

class ChainLinkError(LinkError):
    """One link of a chained call failed; `index` says which (in the order given to `call_chain`)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def call_chain(clients: list[TensorLinkClient], frame: Request, timeout_s: float,
               dead: Callable[[], int | None] = lambda: None,
               poll_s: float = SplitConfig.link_alive_poll_s, sent: Callable[[], None] | None = None
               ) -> tuple[int, Answer]:
    """A decode step through a chain of stages (`split.stage_chain`): send `frame` on the first link; the
    answer comes back on the last one (the chain's last stage answers the origin), and an error frame on the
    link of whichever stage failed. Returns (the index of the link the frame came on, the frame). While
    waiting it watches every link (a stage that dies resets its own) and polls `dead()`: the index of a stage
    whose peer the mesh lost, or None. Raises `ChainLinkError` naming the link that failed (that link is
    closed; a timeout names the last)."""
    last = len(clients) - 1
    with contextlib.ExitStack() as held:
        for client in clients:
            held.enter_context(client._lock)
        deadline = time.monotonic() + timeout_s
        closed = [i for i, client in enumerate(clients) if client._closed]
        index = closed[0] if closed else 0
        try:
            if closed:
                raise LinkError("the tensor link is closed")
            first = clients[0]
            native = frame if type(frame) is NativeCall else None
            if native is not None:
                native.send(first._sealer, first._sock, first._record_timeout)
            else:
                first._set_timeout(first._record_timeout)
                first._sock.sendall(first._sealer.seal(encode_frame(frame)))
            sent_at = time.perf_counter()
            if sent is not None:
                sent()
            arrivals = clients[last]._arrivals  # the chain's answer comes on the last link
            window = arrivals.window()
            if window is not None:
                wait_readable([c._sock for c in clients], sent_at, window)  # read below, as ever
            while True:
                index = last
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LinkError(f"no answer within {timeout_s:.0f} s")
                lost = dead()
                if lost is not None:
                    index = lost
                    raise LinkError("the peer's link went down")
                ready, _, _ = select.select([c._sock for c in clients], [], [], min(poll_s, remaining))
                if not ready:
                    continue
                # the answer first: a stage that failed after passing its step on cannot have an answer
                index = max(i for i, c in enumerate(clients) if c._sock in ready)
                client = clients[index]
                if native is not None and index == last:
                    answer = client._sealer.answer_native(native.lane, client._sock, native)
                    if answer is not None:
                        arrivals.observe(time.perf_counter() - sent_at)
                        return index, answer
                client._set_timeout(client._record_timeout)
                reply = decode_frame(read_record(client._sock, client._sealer, client._record_timeout))
                if reply.request_id != frame.request_id:
                    raise LinkError(f"answer to call {reply.request_id}, expected {frame.request_id}")
                arrivals.observe(time.perf_counter() - sent_at)
                return index, reply
        except (LinkError, ValueError, OSError) as exc:
            clients[index]._release()
            raise ChainLinkError(index, str(exc)) from None
