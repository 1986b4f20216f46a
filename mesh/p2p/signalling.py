"""Signed signalling: offers and answers that prove who sent them and that the sender belongs to the mesh.

A signal is a JSON object::

    {"v": 1, "kind": "offer"|"answer", "mesh": MESH_ID, "from": PEER_ID, "to": PEER_ID or "",
     "name": str, "api": "host:port" or "", "sdp": str, "fp": [DTLS fingerprints in the SDP],
     "ts": unix time, "nonce": hex, "re": nonce of the offer (answers only), "proof": hex, "sig": base64}

`sig` is the sender's ed25519 signature over the canonical JSON of all other fields, so the SDP and its DTLS
fingerprint cannot be changed by a relay (which could otherwise splice itself into the DTLS session).
`proof` is an HMAC with the mesh secret over (mesh, kind, from, to, fingerprints, nonce, ts); a sender on the
allow-list may leave it empty. Receivers refuse a signal — before creating any connection — if it is
malformed, stale, replayed, badly signed, its `fp` differs from the SDP's, or membership is not proven.
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
from shoal.mesh.p2p.invite import check_membership_proof, membership_proof, mesh_id_for

VERSION = 1
MAX_SIGNAL_BYTES = 24_000
MAX_SDP = 16_000
MAX_CLOCK_SKEW_S = 300.0
_FINGERPRINT = re.compile(r"^a=fingerprint:(\S+) ([0-9A-Fa-f:]+)\s*$", re.MULTILINE)
_FIELDS = {"v", "kind", "mesh", "from", "to", "name", "api", "sdp", "fp", "ts", "nonce", "re", "proof", "sig"}


def sdp_fingerprints(sdp: str) -> list[str]:
    """The `a=fingerprint` values of an SDP, as `"alg HEX"` strings, upper-cased, in order."""
    return [f"{alg.lower()} {value.upper()}" for alg, value in _FINGERPRINT.findall(sdp)]


def _canonical(signal: dict[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in signal.items() if k != "sig"}, option=orjson.OPT_SORT_KEYS)


@dataclass
class Membership:
    """How this node decides who belongs: the mesh secret, an allow-list of peer ids, or both."""

    secret: bytes | None = None
    allow: frozenset[str] = frozenset()
    mesh_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.mesh_id = mesh_id_for(self.secret) if self.secret else "allow-list"

    @property
    def active(self) -> bool:
        return bool(self.secret) or bool(self.allow)

    def proof(self, *parts: str) -> str:
        return membership_proof(self.secret, *parts) if self.secret else ""

    def admits(self, peer_id: str, proof: object, *parts: str) -> bool:
        if peer_id in self.allow:
            return True
        return bool(self.secret) and check_membership_proof(self.secret, proof, *parts)


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
    )


def build_signal(
    identity: Identity,
    membership: Membership,
    kind: str,
    sdp: str,
    to: str = "",
    api: str = "",
    reply_to: str = "",
) -> dict[str, Any]:
    """A signed offer or answer from this node."""
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
    signal["proof"] = membership.proof(*_proof_parts(signal))
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


class ReplayGuard:
    """Remembers recent nonces so a captured signal cannot be played again."""

    def __init__(self, capacity: int = 4096) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity

    def check_and_add(self, nonce: str, ts: float) -> None:
        if nonce in self._seen:
            raise SignallingError("replayed signal")
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
        raise SignallingError("signal has unknown fields or version")
    if signal.get("kind") != kind:
        raise SignallingError(f"expected an {kind}, got {signal.get('kind')!r:.20}")
    sender = _require_str(signal, "from", 64)
    try:
        public_key_from_peer_id(sender)
    except IdentityError as exc:
        raise SignallingError(str(exc)) from None
    if sender == my_id:
        raise SignallingError("signal claims to come from this node")
    to = _require_str(signal, "to", 64)
    if to and to != my_id:
        raise SignallingError("signal is addressed to another node")
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
    ts = signal.get("ts")
    if not isinstance(ts, float | int) or isinstance(ts, bool):
        raise SignallingError("signal field 'ts' must be a number")
    if abs((now if now is not None else time.time()) - float(ts)) > MAX_CLOCK_SKEW_S:
        raise SignallingError("signal is stale (or the clocks differ by more than 5 minutes)")
    try:
        signature = base64.b64decode(sig_text, validate=True)
    except ValueError:
        raise SignallingError("signature is not base64") from None
    if not verify_signature(sender, signature, _canonical(signal)):
        raise SignallingError(f"bad signature on {kind} from {sender[:12]}")
    if not fingerprints or fingerprints != sdp_fingerprints(sdp):
        raise SignallingError("DTLS fingerprints in the SDP do not match the signed ones")
    if signal["mesh"] != membership.mesh_id and sender not in membership.allow:
        raise MembershipError(f"{sender[:12]} belongs to another mesh")
    if not membership.admits(sender, signal["proof"], *_proof_parts(signal)):
        raise MembershipError(f"{sender[:12]} proved neither the mesh secret nor a place on the allow-list")
    if replay is not None:
        replay.check_and_add(nonce, float(ts))
    return VerifiedSignal(kind, sender, clean_name(name), api, sdp, nonce, reply_to)
