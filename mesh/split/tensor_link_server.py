"""The stage node's end of direct tensor links (`split.tensor_link` describes the protocol): a listener on
the API's address that grants one-use tokens to linked peers, authenticates each connection on a short-lived
thread, and hands the link to the stage worker (`ServerLink`), which reads and answers it — or, for a grant
made for an offload (`split.offload_link`), keeps it until the offload's `offload.open` claims it by the
grant's `lid`."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from shoal.mesh.p2p.protocol import BinaryFrame
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.tensor_link import (
    TO_ORIGIN,
    TOKEN_BYTES,
    LinkError,
    RecordStream,
    Sealer,
    decode_frame,
    encode_frame,
    recv_exact,
    shutdown_socket,
    tune_socket,
)
from shoal.mesh.split.wire import MICROS_AT

logger = logging.getLogger(__name__)

MAX_PENDING_TOKENS = 256
MAX_HANDSHAKES = 16
MAX_LINKS_PER_PEER = 32
"""Open links of one peer at most (an origin opens one per remote stage of each request in flight)."""
MAX_LINKS = 128
"""Connections still to show a token, at once; more are closed unread."""


@dataclass
class ServerLink:
    """An accepted, authenticated link of `peer`."""

    peer: str
    sock: socket.socket
    sealer: Sealer
    record_timeout_s: float = SplitConfig.link_record_timeout_s
    lane: Any = field(default=None, compare=False)
    """The steady step the worker takes natively on this link (`split.step_lane.StepLane`), or None."""

    def __post_init__(self) -> None:
        self._records = RecordStream(self.sock, self.sealer)

    def take_step(self, native: ModuleType, head: bytes, inputs: np.ndarray) -> int | None:
        """The native lane's read (`RecordStream.take_step`): (request id << 32 | step), or None."""
        return self._records.take_step(native, head, inputs)

    def send_native(self, native: ModuleType, request_id: int, head: bytes, step: int, micros: int,
                    values: np.ndarray, top_1: bool) -> None:
        """`send_frame` of a steady step's answer through the native lane; raises LinkError."""
        self.sealer.send_native(native, self.sock, request_id, head, step, micros, values, top_1=top_1,
                                micros_at=MICROS_AT, timeout_s=self.record_timeout_s)

    def read_frame(self) -> BinaryFrame:
        """Blocking: the next frame (call when the socket is readable, or `buffered`); raises LinkError."""
        return decode_frame(self._records.read())

    @property
    def buffered(self) -> bool:
        """A whole frame came in with the last one read: read it now (the socket will not say so)."""
        return self._records.buffered()

    def send_frame(self, frame: BinaryFrame) -> None:
        try:
            self.sock.sendall(self.sealer.seal(encode_frame(frame)))
        except (OSError, ValueError) as exc:
            raise LinkError(f"sending on the tensor link failed: {exc}") from None

    def shutdown(self) -> None:
        """Any thread: end the link; the owner's next read sees it closed (and then calls `close`)."""
        shutdown_socket(self.sock)

    def close(self) -> None:
        """The owner (the thread that reads the link): release the socket."""
        self.shutdown()
        self.sock.close()


class TensorLinkServer:
    """Listens on the API's address (an ephemeral port), hands out grants to linked peers, and gives
    each authenticated connection to `on_link` (the stage worker, which reads and answers it). One accept
    thread; the handshake of each connection runs on a short-lived thread of its own."""

    def __init__(self, on_link: Callable[[ServerLink], None], config: SplitConfig | None = None) -> None:
        self._host = ""
        self._on_link = on_link
        self._config = config or SplitConfig()
        self._grants: dict[bytes, tuple[str, bytes, float, int | None]] = {}
        """token -> (peer, key, expiry, lid: the id an offload claims the link by, None for a stage link)"""
        self._links: list[ServerLink] = []
        self._parked: dict[tuple[str, int], tuple[ServerLink, float]] = {}
        """Authenticated offload links not claimed yet: (peer, lid) -> (link, expiry)."""
        self._next_lid = int.from_bytes(os.urandom(3), "little")
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.handshakes = 0
        """Connections accepted and still to show their token (at most `MAX_HANDSHAKES` at once)."""
        self.port = 0

    def start(self, host: str) -> None:
        """Listen on `host` (raises OSError if it cannot)."""
        self._host = host
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, 0))
        listener.listen(16)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="tensor-link-accept", daemon=True)
        self._thread.start()
        logger.info("tensor links on %s:%d", self._host, self.port)

    def grant(self, peer: str, park: bool = False) -> dict[str, object]:
        """A one-use token and a fresh key for `peer` (sent over the encrypted control channel). `park`: the
        link is for an offload's tokens — kept, once authenticated, until `claim(peer, lid)` (the grant's
        `lid`) takes it, at most `link_token_ttl_s`."""
        if self._listener is None:
            raise LinkError("tensor links are not listening")
        token, key = secrets.token_bytes(TOKEN_BYTES), os.urandom(32)
        now = time.monotonic()
        with self._lock:
            self._grants = {t: g for t, g in self._grants.items() if g[2] > now}
            if len(self._grants) >= MAX_PENDING_TOKENS:
                raise LinkError("too many tensor link grants pending")
            lid = None
            if park:
                self._next_lid = lid = (self._next_lid + 1) % 2**32
            self._grants[token] = (peer, key, now + self._config.link_token_ttl_s, lid)
        granted: dict[str, object] = {"port": self.port, "token": token.hex(), "key": key.hex()}
        if lid is not None:
            granted["lid"] = lid
        return granted

    def claim(self, peer: str, lid: object) -> ServerLink | None:
        """The authenticated offload link `peer` made with the grant `lid`, now the caller's (it closes it);
        None when there is none (not made, expired, claimed already)."""
        with self._lock:
            self._expire_parked()
            entry = self._parked.pop((peer, lid), None) if type(lid) is int else None
        return None if entry is None else entry[0]

    def _expire_parked(self) -> None:
        """With the lock held: close parked links nobody claimed in time."""
        now = time.monotonic()
        for key in [k for k, (_, until) in self._parked.items() if until < now]:
            link, _ = self._parked.pop(key)
            link.close()

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                sock, address = listener.accept()
            except OSError:  # closed by stop()
                return
            with self._lock:
                full = self.handshakes >= MAX_HANDSHAKES
                if not full:
                    self.handshakes += 1
            if full:
                logger.warning("tensor link from %s refused: too many handshakes at once", address[0])
                sock.close()
                continue
            threading.Thread(target=self._handshake, args=(sock, address), name="tensor-link-handshake",
                             daemon=True).start()

    def _handshake(self, sock: socket.socket, address: tuple) -> None:
        try:
            self._authenticate(sock, address)
        finally:
            with self._lock:
                self.handshakes -= 1

    def _authenticate(self, sock: socket.socket, address: tuple) -> None:
        link: ServerLink | None = None
        try:
            sock.settimeout(self._config.link_handshake_timeout_s)
            tune_socket(sock)
            token = recv_exact(sock, TOKEN_BYTES)
            with self._lock:  # check and take a place in one step: concurrent handshakes count each other
                grant = self._grants.pop(token, None)
                if grant is None or grant[2] < time.monotonic():
                    raise LinkError("unknown or expired token")
                peer, key, _, lid = grant
                self._expire_parked()
                self._links = [x for x in self._links if x.sock.fileno() != -1]
                mine = sum(x.peer == peer for x in self._links)
                if len(self._links) >= MAX_LINKS or mine >= MAX_LINKS_PER_PEER:
                    raise LinkError(f"too many tensor links open (peer {peer[:12]}: {mine})")
                link = ServerLink(peer, sock, Sealer(key, TO_ORIGIN), self._config.link_record_timeout_s)
                self._links.append(link)
                if lid is not None:  # parked before the origin hears it was taken: its claim finds it
                    self._parked[(peer, lid)] = (link, time.monotonic() + self._config.link_token_ttl_s)
            # for good: every read and write of the link — set before the answer, after which an offload's
            # claim may take the socket to its event loop at any moment
            sock.settimeout(self._config.link_record_timeout_s)
            sock.sendall(link.sealer.seal(b""))
        except (LinkError, OSError) as exc:
            logger.warning("tensor link from %s refused: %s", address[0], exc)
            with self._lock:
                self._links = [x for x in self._links if x is not link]
                self._parked = {k: v for k, v in self._parked.items() if v[0] is not link}
            sock.close()
            return
        if lid is not None:
            logger.info("offload link %d from peer %s (%s)", lid, peer[:12], address[0])
            return
        logger.info("tensor link from peer %s (%s)", peer[:12], address[0])
        self._on_link(link)

    def drop_peer(self, peer: str) -> None:
        """Close every link of a peer that left the mesh."""
        with self._lock:
            gone = [x for x in self._links if x.peer == peer]
            self._links = [x for x in self._links if x.peer != peer]
            self._grants = {t: g for t, g in self._grants.items() if g[0] != peer}
            self._parked = {k: v for k, v in self._parked.items() if k[0] != peer}
        for link in gone:
            link.shutdown()

    def stop(self) -> None:
        """Idempotent: stop accepting, close every link."""
        listener, self._listener = self._listener, None
        if listener is not None:
            shutdown_socket(listener)  # wakes the blocked accept() (Linux)
            listener.close()
        with self._lock:
            links, self._links = self._links, []
            self._grants.clear()
            self._parked.clear()
        for link in links:
            link.shutdown()
