"""Usage receipts: a record of work one member served for another, signed by both.

A receipt says who served whom (peer ids), which model (CID) and layer span, how many tokens went in and
came out, and when. The server signs the receipt's canonical bytes; the client countersigns the receipt
together with the server's signature. Peer ids carry their ed25519 public keys (`p2p/identity.py`), so
anyone can check both signatures offline, with the receipt alone — `shoal usage verify FILE`.

Each side keeps its receipts append-only, one JSON object per line, in `<data_dir>/usage/receipts.jsonl`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
from shoal.mesh.p2p.errors import IdentityError
from shoal.mesh.p2p.identity import Identity, public_key_from_peer_id, verify_signature

RECEIPT_VERSION = 1
MAX_RECEIPT_BYTES = 4096
"""A receipt line longer than this is refused (a peer cannot grow our log with one message)."""
MAX_TOKENS = 10_000_000
KINDS = ("offload", "stage")


class ReceiptError(ValueError):
    """A receipt that is malformed, or whose signatures do not hold."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ReceiptError("a signature is not base64") from exc


@dataclass(frozen=True)
class Usage:
    """What was served: the signed body of a receipt."""

    server: str
    """Peer id of the member that did the work."""
    client: str
    """Peer id of the member the work was done for."""
    request: str
    """The client's request id (unique per client)."""
    kind: str
    """`offload` (a whole request) or `stage` (a layer span of a split)."""
    model: str
    """CID (or name, where the model has no CID) of the model file."""
    span: tuple[int, int]
    """Layers [start, stop) the server ran."""
    tokens_in: int
    """Prompt tokens the server processed."""
    tokens_out: int
    """Tokens generated (offload) or decode steps run (stage)."""
    started: float
    finished: float
    v: int = RECEIPT_VERSION

    def __post_init__(self) -> None:
        for who in (self.server, self.client):
            try:
                public_key_from_peer_id(who)
            except IdentityError as exc:
                raise ReceiptError(str(exc)) from None
        if self.server == self.client:
            raise ReceiptError("a receipt needs two different members")
        if self.kind not in KINDS:
            raise ReceiptError(f"kind must be one of {', '.join(KINDS)}")
        if not (0 < len(self.request) <= 128 and 0 < len(self.model) <= 128):
            raise ReceiptError("request and model must be 1-128 characters")
        start, stop = self.span
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= 100_000):
            raise ReceiptError(f"bad layer span {self.span!r}")
        for count in (self.tokens_in, self.tokens_out):
            if not (isinstance(count, int) and 0 <= count <= MAX_TOKENS):
                raise ReceiptError("token counts must be integers in 0..10^7")
        if not 0 <= self.started <= self.finished:
            raise ReceiptError("finished must not precede started")
        if self.v != RECEIPT_VERSION:
            raise ReceiptError(f"unknown receipt version {self.v}")

    def canonical(self) -> bytes:
        """The bytes the server signs: sorted-key JSON of the body."""
        body = asdict(self)
        body["span"] = list(self.span)
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_dict(cls, data: Any) -> Usage:
        if not isinstance(data, dict):
            raise ReceiptError("a receipt body must be an object")
        try:
            span = data["span"]
            if not (isinstance(span, list) and len(span) == 2):
                raise ReceiptError("span must be [start, stop]")
            return cls(server=str(data["server"]), client=str(data["client"]), request=str(data["request"]),
                       kind=str(data["kind"]), model=str(data["model"]), span=(span[0], span[1]),
                       tokens_in=data["tokens_in"], tokens_out=data["tokens_out"],
                       started=float(data["started"]), finished=float(data["finished"]), v=data.get("v", 0))
        except KeyError as exc:
            raise ReceiptError(f"a receipt lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ReceiptError(f"malformed receipt: {exc}") from None


@dataclass(frozen=True)
class Receipt:
    """A `Usage` with the server's signature and, once countersigned, the client's."""

    usage: Usage
    server_sig: str
    client_sig: str = ""

    def server_signed_bytes(self) -> bytes:
        return self.usage.canonical()

    def client_signed_bytes(self) -> bytes:
        """The client signs the body and the server's signature together."""
        return self.usage.canonical() + b"." + self.server_sig.encode("ascii")

    def check(self, require_countersign: bool = True) -> None:
        """Raise `ReceiptError` unless the server's (and the client's) signature hold."""
        if not verify_signature(self.usage.server, _unb64(self.server_sig), self.server_signed_bytes()):
            raise ReceiptError(f"the server signature of request {self.usage.request} does not verify")
        if not self.client_sig:
            if require_countersign:
                raise ReceiptError(f"request {self.usage.request} is not countersigned by its client")
            return
        if not verify_signature(self.usage.client, _unb64(self.client_sig), self.client_signed_bytes()):
            raise ReceiptError(f"the client signature of request {self.usage.request} does not verify")

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self.usage)
        body["span"] = list(self.usage.span)
        return {"usage": body, "server_sig": self.server_sig, "client_sig": self.client_sig}

    def to_line(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS) + b"\n"

    @classmethod
    def from_dict(cls, data: Any) -> Receipt:
        if not isinstance(data, dict):
            raise ReceiptError("a receipt must be an object")
        server_sig, client_sig = data.get("server_sig"), data.get("client_sig", "")
        if not isinstance(server_sig, str) or not isinstance(client_sig, str):
            raise ReceiptError("signatures must be strings")
        if len(server_sig) > 100 or len(client_sig) > 100:
            raise ReceiptError("a signature is too long")
        return cls(Usage.from_dict(data.get("usage")), server_sig, client_sig)

    @classmethod
    def from_line(cls, line: bytes | str) -> Receipt:
        if len(line) > MAX_RECEIPT_BYTES:
            raise ReceiptError(f"a receipt line is longer than {MAX_RECEIPT_BYTES} bytes")
        try:
            return cls.from_dict(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise ReceiptError(f"a receipt line is not JSON: {exc}") from None


def sign_as_server(identity: Identity, usage: Usage) -> Receipt:
    if usage.server != identity.peer_id:
        raise ReceiptError("only the serving member signs as server")
    return Receipt(usage, _b64(identity.sign(usage.canonical())))


def countersign(identity: Identity, receipt: Receipt) -> Receipt:
    """The client's countersignature, after checking the server's and that the receipt names this client."""
    if receipt.usage.client != identity.peer_id:
        raise ReceiptError("this receipt names another client")
    receipt.check(require_countersign=False)
    signed = Receipt(receipt.usage, receipt.server_sig)
    return Receipt(receipt.usage, receipt.server_sig, _b64(identity.sign(signed.client_signed_bytes())))


@dataclass
class PeerTotals:
    """Work between this node and one peer, both directions."""

    given_requests: int = 0
    given_tokens: int = 0
    received_requests: int = 0
    received_tokens: int = 0
    last: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReceiptLog:
    """This node's receipts, appended one JSON line each (fsync'd), and totals per peer."""

    path: Path
    me: str
    """This node's peer id: receipts it served count as given, the others as received."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def in_data_dir(cls, data_dir: Path, me: str) -> ReceiptLog:
        return cls(Path(data_dir) / "usage" / "receipts.jsonl", me)

    def append(self, receipt: Receipt) -> None:
        """Keep a fully signed receipt that involves this node (blocking: call it from a thread)."""
        receipt.check()
        if self.me not in (receipt.usage.server, receipt.usage.client):
            raise ReceiptError("this receipt does not involve this node")
        line = receipt.to_line()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def receipts(self) -> Iterator[Receipt]:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    yield Receipt.from_line(line)

    def totals(self) -> dict[str, PeerTotals]:
        return totals(self.receipts(), self.me)


def totals(receipts: Iterable[Receipt], me: str) -> dict[str, PeerTotals]:
    """Per-peer totals from this node's point of view (`me`): given = served by me, received = for me."""
    by_peer: dict[str, PeerTotals] = {}
    for receipt in receipts:
        usage = receipt.usage
        tokens = usage.tokens_in + usage.tokens_out
        if usage.server == me:
            entry = by_peer.setdefault(usage.client, PeerTotals())
            entry.given_requests += 1
            entry.given_tokens += tokens
        elif usage.client == me:
            entry = by_peer.setdefault(usage.server, PeerTotals())
            entry.received_requests += 1
            entry.received_tokens += tokens
        else:
            continue
        entry.last = max(entry.last, usage.finished)
    return by_peer


def verify_file(path: Path) -> tuple[int, list[str]]:
    """Check every receipt in a JSON Lines file: (receipts that verify, problems by line number)."""
    good, problems = 0, []
    with Path(path).open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                Receipt.from_line(line).check()
            except ReceiptError as exc:
                problems.append(f"line {number}: {exc}")
            else:
                good += 1
    return good, problems


def now() -> float:
    return round(time.time(), 3)


class HasIdentity(Protocol):
    """Whatever holds this node's identity once it has started (the mesh service)."""

    @property
    def identity(self) -> Identity: ...


@dataclass(frozen=True)
class Expected:
    """What the client saw of a request it asked a peer to serve: the receipt must say the same."""

    server: str
    request: str
    kind: str
    model: str
    tokens_in: int
    tokens_out: int


MAX_PENDING = 1024
"""Receipts issued and not yet countersigned that a server remembers (oldest forgotten first)."""


class UsageLedger:
    """One node's receipts: issues them as server, countersigns them as client, keeps both kinds.

    File writes go to a thread; everything else is a few signature checks (~0.1 ms)."""

    def __init__(self, holder: HasIdentity, data_dir: Path) -> None:
        self._holder = holder
        self._data_dir = Path(data_dir)
        self._log: ReceiptLog | None = None
        self._pending: dict[tuple[str, str], Receipt] = {}

    @property
    def log(self) -> ReceiptLog:
        if self._log is None:
            self._log = ReceiptLog.in_data_dir(self._data_dir, self._holder.identity.peer_id)
        return self._log

    def issue(self, usage: Usage) -> Receipt:
        """Sign `usage` as its server and remember it until the client countersigns."""
        receipt = sign_as_server(self._holder.identity, usage)
        self._pending[(usage.client, usage.request)] = receipt
        while len(self._pending) > MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
        return receipt

    async def accept(self, client: str, data: Any) -> Receipt:
        """Server side: the client's countersigned copy of a receipt this node issued; kept once it holds."""
        receipt = Receipt.from_dict(data)
        issued = self._pending.get((client, receipt.usage.request))
        if issued is None or (issued.usage, issued.server_sig) != (receipt.usage, receipt.server_sig):
            raise ReceiptError(f"{client[:12]} returned a receipt this node did not issue")
        receipt.check()
        await asyncio.to_thread(self.log.append, receipt)
        self._pending.pop((client, receipt.usage.request), None)
        return receipt

    async def countersign(self, expected: Expected, data: Any) -> Receipt:
        """Client side: check a server's receipt against what this node saw, countersign and keep it."""
        receipt = Receipt.from_dict(data)
        usage = receipt.usage
        seen = (usage.server, usage.request, usage.kind, usage.model, usage.tokens_in, usage.tokens_out)
        wanted = (expected.server, expected.request, expected.kind, expected.model, expected.tokens_in,
                  expected.tokens_out)
        if seen != wanted:
            raise ReceiptError(f"the receipt from {expected.server[:12]} says {seen[2:]}, this node saw "
                               f"{wanted[2:]}")
        signed = countersign(self._holder.identity, receipt)
        await asyncio.to_thread(self.log.append, signed)
        return signed

    async def view(self) -> dict[str, Any]:
        """Per-peer totals for `GET /v1/mesh/usage`."""
        by_peer = await asyncio.to_thread(self.log.totals)
        return {"self": self.log.me, "receipts": str(self.log.path),
                "peers": {peer: entry.to_dict() for peer, entry in sorted(by_peer.items())}}
