"""`[mesh]` configuration: membership, discovery, ICE and link timing. Frozen; validated on creation."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from shoal.mesh.p2p.errors import IdentityError, InviteError
from shoal.mesh.p2p.identity import public_key_from_peer_id
from shoal.mesh.p2p.invite import Invite


def _as_tuple(value: object, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{key} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class MeshConfig:
    """`[mesh]`: how this node joins and links to a mesh. With no invite, secret or allow-list the node
    serves only itself (the mesh service stays idle until `POST /v1/mesh/join`)."""

    name: str | None = None
    """Name shown to peers; default: the node's name."""
    invite: str | None = None
    """Invite token (`shoal1-...`) from `shoal mesh create`: mesh secret plus bootstrap addresses."""
    secret: str | None = None
    """The mesh secret as base64 or hex, instead of an invite."""
    allow: list[str] = field(default_factory=list)
    """Peer ids admitted without the secret (or the only members, with no secret)."""
    bootstrap: list[str] = field(default_factory=list)
    """`host:port` API addresses of members to contact (in addition to the invite's)."""
    advertise: str | None = None
    """`host:port` under which peers can reach this node's API; default: the bound address."""
    mdns: bool = True
    """Announce and browse `_shoal._tcp` on the LAN."""
    ice_interfaces: list[str] = field(default_factory=list)
    """Interfaces (names or addresses) for ICE host candidates; empty: aioice's default (no loopback)."""
    stun: list[str] = field(default_factory=list)
    """STUN server URLs (`stun:host:port`); none by default."""
    turn: list[str] = field(default_factory=list)
    """TURN server URLs; none by default."""
    turn_username: str | None = None
    turn_password: str | None = None
    heartbeat_interval_s: float = 1.0
    """Ping period on each link."""
    dead_timeout_s: float = 4.0
    """Silence after which a link counts as dead and its peer is dropped."""
    connect_timeout_s: float = 10.0
    """Limit on one signalling exchange plus channel opening."""
    request_timeout_s: float = 10.0
    """Default wait for a peer's reply."""
    gossip_interval_s: float = 10.0
    """Period of advert broadcasts (adverts also go out on change)."""
    retry_max_s: float = 30.0
    """Cap of the exponential back-off between connection attempts to one address."""
    refused_retry_max_s: float = 300.0
    """Cap of the back-off (from 1 s, doubling) at an address whose node refused this one: not a member,
    expired invite, banned. The refusal shows as `mesh.status: "refused"` in `GET /v1/mesh/peers`."""
    ban_s: float = 300.0
    """How long a peer that broke the protocol too often stays banned."""
    abuse_limit: int = 5
    """Protocol violations tolerated per link before close and ban."""
    max_peers: int = 32
    """Most simultaneous links."""

    def __post_init__(self) -> None:
        for key in ("allow", "bootstrap", "ice_interfaces", "stun", "turn"):
            object.__setattr__(self, key, _as_tuple(getattr(self, key), key))
        for peer_id in self.allow:
            try:
                public_key_from_peer_id(peer_id)
            except IdentityError as exc:
                raise ValueError(f"allow: {exc}") from None
        if self.invite:
            try:
                Invite.from_token(self.invite)
            except InviteError as exc:
                raise ValueError(f"invite: {exc}") from None
        if self.secret is not None:
            self.secret_bytes()
        for key, schemes in (("stun", ("stun", "stuns")), ("turn", ("turn", "turns"))):
            for url in getattr(self, key):
                # aiortc (~0.3 s to import) only where ICE servers are configured: `shoal chat` reads this too
                from aiortc.rtcicetransport import parse_stun_turn_uri

                try:
                    scheme = parse_stun_turn_uri(url)["scheme"]
                except ValueError as exc:
                    raise ValueError(f"{key}: {url!r:.100} is not a {key} URL ({exc})") from None
                if scheme not in schemes:
                    raise ValueError(f"{key}: {url!r:.100} is not a {key} URL ({schemes[0]}:host:port)")
        for key in (
            "heartbeat_interval_s",
            "dead_timeout_s",
            "connect_timeout_s",
            "request_timeout_s",
            "gossip_interval_s",
            "retry_max_s",
            "refused_retry_max_s",
        ):
            if not 0.05 <= getattr(self, key) <= 3600:
                raise ValueError(f"{key} must be between 0.05 and 3600 seconds")
        if self.dead_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError("dead_timeout_s must be at least twice heartbeat_interval_s")
        if self.ban_s < 0 or not 1 <= self.abuse_limit <= 1000 or not 1 <= self.max_peers <= 1024:
            raise ValueError("ban_s >= 0, abuse_limit in [1, 1000], max_peers in [1, 1024]")
        for address in (*self.bootstrap, *([self.advertise] if self.advertise else [])):
            if ":" not in address or not address.rsplit(":", 1)[1].isdigit():
                raise ValueError(f"address {address!r} must be host:port")

    def secret_bytes(self) -> bytes | None:
        """The mesh secret from `secret` or, failing that, from `invite`."""
        if self.secret:
            text = self.secret.strip()
            try:
                raw = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
            except (ValueError, binascii.Error):
                raise ValueError("secret must be hex (64 digits) or base64") from None
            if len(raw) < 16:
                raise ValueError("secret must have at least 16 bytes")
            return raw
        if self.invite:
            invite = Invite.from_token(self.invite)
            return invite.secret if invite.expires is None else None
        return None

    def all_bootstrap(self) -> tuple[str, ...]:
        invite = Invite.from_token(self.invite).bootstrap if self.invite else ()
        return tuple(dict.fromkeys((*self.bootstrap, *invite)))
