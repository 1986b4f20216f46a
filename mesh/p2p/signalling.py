"""Signed signalling: offers and answers that prove who sent them and that the sender belongs to the mesh.

A signal is a JSON object::

    {"v": 1, "kind": "offer"|"answer", "mesh": MESH_ID, "from": PEER_ID, "to": PEER_ID or "",
     "name": str, "api": "host:port" or "", "sdp": str, "fp": [DTLS fingerprints in the SDP],
     "ts": unix time, "nonce": hex, "re": nonce of the offer (answers only), "inv": invite expiry (optional),
     "proof": hex, "sig": base64}

`sig` is the sender's ed25519 signature over the canonical JSON of all other fields, so the SDP and its DTLS
fingerprint cannot be changed by a relay (which could otherwise splice itself into the DTLS session).
`proof` is an HMAC with the mesh secret over (mesh, kind, from, to, fingerprints, nonce, ts); a sender on the
allow-list may leave it empty. A joiner holding an expiring invite proves with the invite's key instead and
names its expiry in `inv` (`mesh.p2p.invite`); a member derives that key from the secret, refuses the offer
once `inv` has passed (`invite_expired`), and answers with a proof made with the same key.
Receivers refuse a signal — before creating any connection — if it is malformed, stale, replayed, badly
signed, its `fp` differs from the SDP's, or membership is not proven; the `SignallingError` raised carries a
`code` that is sent back to the sender.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
from shoal.mesh.p2p.errors import IdentityError, MembershipError, SignallingError
from shoal.mesh.p2p.identity import Identity, clean_name, public_key_from_peer_id, verify_signature
from shoal.mesh.p2p.invite import (
    MAX_EXPIRY,
    Invite,
    check_membership_proof,
    invite_key,
    membership_proof,
    mesh_id_for,
)

VERSION = 1
MAX_SIGNAL_BYTES = 24_000
MAX_SDP = 16_000
MAX_CLOCK_SKEW_S = 300.0
_FINGERPRINT = re.compile(r"^a=fingerprint:(\S+) ([0-9A-Fa-f:]+)\s*$", re.MULTILINE)
_FIELDS = frozenset("v kind mesh from to name api sdp fp ts nonce re inv proof sig".split())


def sdp_fingerprints(sdp: str) -> list[str]:
    """The `a=fingerprint` values of an SDP, as `"alg HEX"` strings, upper-cased, in order."""
    return [f"{alg.lower()} {value.upper()}" for alg, value in _FINGERPRINT.findall(sdp)]


def _canonical(signal: dict[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in signal.items() if k != "sig"}, option=orjson.OPT_SORT_KEYS)


@dataclass
class Membership:
    """How this node decides who belongs: the mesh secret (or, until a member hands that over, the key of an
    expiring invite), an allow-list of peer ids, or both."""

    secret: bytes | None = None
    allow: frozenset[str] = frozenset()
    invite_expires: int | None = None
    """Set while `secret` is an expiring invite's key rather than the mesh secret."""
    invite_mesh: str | None = None
    """The mesh id named by that invite."""
    mesh_id: str = field(init=False)

    def __post_init__(self) -> None:
        if self.invite_expires is not None:
            self.mesh_id = self.invite_mesh or "?"
        else:
            self.mesh_id = mesh_id_for(self.secret) if self.secret else "allow-list"

    @classmethod
    def from_invite(cls, invite: Invite, allow: frozenset[str] = frozenset()) -> Membership:
        return cls(invite.secret, allow, invite.expires, invite.mesh)

    @property
    def active(self) -> bool:
        return bool(self.secret) or bool(self.allow)

    @property
    def has_mesh_secret(self) -> bool:
        return bool(self.secret) and self.invite_expires is None

    def key_for(self, invite_expires: int | None) -> bytes | None:
        """The HMAC key of a proof made with the invite expiring at `invite_expires` (None: with the mesh
        secret), or None where this node cannot make or check such a proof."""
        if not self.secret:
            return None
        if invite_expires is None:
            return self.secret if self.invite_expires is None else None
        if self.invite_expires is None:
            return invite_key(self.secret, invite_expires)
        return self.secret if invite_expires == self.invite_expires else None


def _proof_parts(signal: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(signal["mesh"]),
        str(signal["kind"]),
        str(signal["from"]),
        str(signal["to"]),
        ",".join(signal["fp"]),
        str(signal["nonce"]),
        repr(float(signal["ts"])),
        str(signal.get("re", "")),
        *((str(signal["inv"]),) if "inv" in signal else ()),
    )


def build_signal(
    identity: Identity,
    membership: Membership,
    kind: str,
    sdp: str,
    to: str = "",
    api: str = "",
    reply_to: str = "",
    invite: int | None = None,
) -> dict[str, Any]:
    """A signed offer or answer from this node; `invite`: prove with the key of the invite expiring then
    (an answer to a joiner that proved with it)."""
    if kind not in ("offer", "answer"):
        raise ValueError("kind is 'offer' or 'answer'")
    signal: dict[str, Any] = {
        "v": VERSION,
        "kind": kind,
        "mesh": membership.mesh_id,
        "from": identity.peer_id,
        "to": to,
        "name": identity.name,
        "api": api,
        "sdp": sdp,
        "fp": sdp_fingerprints(sdp),
        "ts": float(time.time()),
        "nonce": secrets.token_hex(16),
    }
    if reply_to:
        signal["re"] = reply_to
    expires = membership.invite_expires if membership.invite_expires is not None else invite
    if expires is not None:
        signal["inv"] = expires
    key = membership.key_for(expires)
    signal["proof"] = membership_proof(key, *_proof_parts(signal)) if key else ""
    signal["sig"] = base64.b64encode(identity.sign(_canonical(signal))).decode("ascii")
    return signal


@dataclass(frozen=True)
class VerifiedSignal:
    kind: str
    peer_id: str
    name: str
    api: str
    sdp: str
    nonce: str
    reply_to: str
    admitted: str = "secret"
    """How the sender proved membership: `secret`, `invite` (an expiring invite's key) or `allow`."""
    invite_expires: int | None = None
    ts: float = 0.0
    """When the sender signed it (unix time)."""


class ReplayGuard:
    """Remembers recent nonces so a captured signal cannot be played again."""

    def __init__(self, capacity: int = 4096) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity

    def check_and_add(self, nonce: str, ts: float) -> None:
        if nonce in self._seen:
            raise SignallingError("replayed signal", "replayed")
        self._seen[nonce] = ts
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)


def _require_str(signal: dict[str, Any], key: str, max_len: int) -> str:
    value = signal.get(key)
    if not isinstance(value, str) or len(value) > max_len:
        raise SignallingError(f"signal field {key!r} must be a string of at most {max_len} characters")
    return value


def verify_signal(
    signal: object,
    membership: Membership,
    my_id: str,
    kind: str,
    replay: ReplayGuard | None = None,
    now: float | None = None,
) -> VerifiedSignal:
    """Check a received signal completely; raise `SignallingError`/`MembershipError` on any problem."""
    if not isinstance(signal, dict):
        raise SignallingError("signal is not an object")
    try:
        size = len(orjson.dumps(signal))
    except (TypeError, ValueError) as exc:  # e.g. integers beyond 64 bits from a non-orjson parser
        raise SignallingError(f"signal is not plain JSON: {exc}") from None
    if size > MAX_SIGNAL_BYTES:
        raise SignallingError("signal is too large")
    if set(signal) - _FIELDS or signal.get("v") != VERSION:
        raise SignallingError("signal has unknown fields or version", "unsupported_version")
    if signal.get("kind") != kind:
        raise SignallingError(f"expected an {kind}, got {signal.get('kind')!r:.20}")
    sender = _require_str(signal, "from", 64)
    try:
        public_key_from_peer_id(sender)
    except IdentityError as exc:
        raise SignallingError(str(exc)) from None
    if sender == my_id:
        raise SignallingError("signal claims to come from this node", "self")
    to = _require_str(signal, "to", 64)
    if to and to != my_id:
        raise SignallingError("signal is addressed to another node", "wrong_addressee")
    sdp = _require_str(signal, "sdp", MAX_SDP)
    name = _require_str(signal, "name", 200)
    api = _require_str(signal, "api", 200)
    nonce = _require_str(signal, "nonce", 64)
    reply_to = _require_str(signal, "re", 64) if "re" in signal else ""
    _require_str(signal, "mesh", 64)
    _require_str(signal, "proof", 128)
    sig_text = _require_str(signal, "sig", 200)
    fingerprints = signal.get("fp")
    if not isinstance(fingerprints, list) or not all(isinstance(f, str) for f in fingerprints):
        raise SignallingError("signal field 'fp' must be a list of strings")
    expires = signal.get("inv")
    if expires is not None and (type(expires) is not int or not 0 < expires < MAX_EXPIRY):
        raise SignallingError("signal field 'inv' must be a unix time in seconds")
    ts = signal.get("ts")
    if not isinstance(ts, float | int) or isinstance(ts, bool):
        raise SignallingError("signal field 'ts' must be a number")
    now = now if now is not None else time.time()
    if abs(now - float(ts)) > MAX_CLOCK_SKEW_S:
        raise SignallingError("signal is stale (or the clocks differ by more than 5 minutes)", "stale")
    try:
        signature = base64.b64decode(sig_text, validate=True)
    except ValueError:
        raise SignallingError("signature is not base64") from None
    if not verify_signature(sender, signature, _canonical(signal)):
        raise SignallingError(f"bad signature on {kind} from {sender[:12]}", "bad_signature")
    if not fingerprints or fingerprints != sdp_fingerprints(sdp):
        raise SignallingError("DTLS fingerprints in the SDP do not match the signed ones", "bad_signature")
    if signal["mesh"] != membership.mesh_id and sender not in membership.allow:
        raise MembershipError(
            f"{sender[:12]} belongs to another mesh ({str(signal['mesh'])[:20]}, not {membership.mesh_id})",
            "foreign_mesh",
        )
    admitted = _admitted(membership, sender, signal, expires)
    if admitted == "invite" and kind == "offer" and membership.has_mesh_secret and now > expires:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        raise MembershipError(f"the invite {sender[:12]} joined with expired at {when}", "invite_expired")
    if replay is not None:
        replay.check_and_add(nonce, float(ts))
    return VerifiedSignal(
        kind, sender, clean_name(name), api, sdp, nonce, reply_to, admitted, expires, float(ts)
    )


def _admitted(membership: Membership, sender: str, signal: dict[str, Any], expires: int | None) -> str:
    key = membership.key_for(expires)
    if key is not None and check_membership_proof(key, signal["proof"], *_proof_parts(signal)):
        return "secret" if expires is None else "invite"
    if sender in membership.allow:
        return "allow"
    if key is None and membership.invite_expires is not None:
        # a joiner not yet handed the mesh secret cannot check a proof made with it: ask again later
        raise MembershipError("this node holds only an invite so far, not the mesh secret", "invite_only")
    raise MembershipError(f"{sender[:12]} proved neither the mesh secret nor a place on the allow-list")
