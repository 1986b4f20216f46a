"""Invites: a mesh's name, secret and bootstrap addresses as one copy-pasteable token (and a terminal QR).

Token: `shoal1-` + base64url(orjson({"n": name, "s": secret_b64, "b": [addresses]}) || sha256[:4]).
The mesh id is derived from the secret (`mesh_id_for`), so it can be shown and announced (mDNS) without
revealing the secret.

An expiring invite carries no mesh secret: `{"n", "k": invite key, "e": expiry (unix s), "m": mesh id, "b"}`
where the key is HMAC(secret, expiry) (`invite_key`). Members derive the key from the expiry a joiner claims,
so a joiner who edits `e` holds the wrong key and is refused; after `e` members refuse it as expired. Once
linked, a member sends the joiner the mesh secret over the link (`mesh.key`, see `mesh.p2p.rekey`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
from shoal.mesh.p2p.errors import InviteError

PREFIX = "shoal1-"
SECRET_BYTES = 32
MAX_TOKEN_LENGTH = 4096
MAX_BOOTSTRAP = 16
MAX_SERVERS = 8
MAX_EXPIRY = 2**40


def mesh_id_for(secret: bytes) -> str:
    """A public name of the mesh, derived from its secret: `m` + 16 base32 characters."""
    digest = hashlib.sha256(b"shoal mesh id\x00" + secret).digest()[:10]
    return "m" + base64.b32encode(digest).decode("ascii").lower()


def membership_proof(secret: bytes, *parts: str) -> str:
    """HMAC-SHA256 over the given fields with the mesh secret, hex."""
    message = b"\x00".join(part.encode("utf-8") for part in parts)
    return hmac.new(secret, b"shoal member\x00" + message, hashlib.sha256).hexdigest()


def check_membership_proof(secret: bytes, proof: object, *parts: str) -> bool:
    if not isinstance(proof, str):
        return False
    return hmac.compare_digest(membership_proof(secret, *parts), proof)


def invite_key(secret: bytes, expires: int) -> bytes:
    """The key an invite expiring at `expires` (unix seconds) carries instead of the mesh secret."""
    return hmac.new(secret, b"shoal invite\x00" + str(expires).encode(), hashlib.sha256).digest()


def check_expiry(expires: object) -> int:
    if type(expires) is not int or not 0 < expires < MAX_EXPIRY:
        raise InviteError(f"invite expiry must be a unix time in seconds, got {expires!r:.40}")
    return expires


def _check_address(address: object) -> str:
    if not isinstance(address, str) or not 3 <= len(address) <= 200 or any(c.isspace() for c in address):
        raise InviteError(f"bad bootstrap address {address!r:.80}")
    return address


def _check_server(url: object) -> str:
    if not isinstance(url, str) or not 6 <= len(url) <= 200 or any(c.isspace() for c in url):
        raise InviteError(f"bad STUN/TURN server {url!r:.80} (stun:host:port or turn:host:port)")
    if url.split(":", 1)[0] not in ("stun", "stuns", "turn", "turns"):
        raise InviteError(f"bad STUN/TURN server {url!r:.80} (stun:host:port or turn:host:port)")
    return url


@dataclass(frozen=True)
class Invite:
    """What a device needs to join a mesh."""

    name: str
    """Human name of the mesh."""
    secret: bytes
    """The shared mesh secret (32 random bytes); proves membership in signalling."""
    bootstrap: tuple[str, ...] = ()
    """`host:port` API addresses of members to contact first."""
    expires: int | None = None
    """Unix time after which members refuse the invite; set only on an expiring invite, whose `secret` is
    then the invite key (`invite_key`), not the mesh secret."""
    mesh: str | None = None
    """The mesh id; given only with `expires` (the mesh id cannot be derived from an invite key)."""
    servers: tuple[str, ...] = ()
    """The mesh's STUN/TURN servers (`stun:host:port`, `turn:host:port?transport=tcp`, ...), which a joiner
    uses besides its own `[mesh] stun`/`turn`. Members derive TURN credentials from the mesh secret
    (`mesh.p2p.relays`)."""
    turn_credential: tuple[str, str] | None = None
    """On an expiring invite (whose holder has no mesh secret to derive them from): a TURN REST-style
    (username, password) that expires with the invite."""

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise InviteError("a mesh secret has at least 16 bytes")
        if self.expires is not None:
            check_expiry(self.expires)
            if not isinstance(self.mesh, str) or not 2 <= len(self.mesh) <= 64 or not self.mesh.isalnum():
                raise InviteError("an expiring invite names its mesh id")
        elif self.mesh is not None:
            raise InviteError("only an expiring invite names its mesh id")
        if len(self.bootstrap) > MAX_BOOTSTRAP:
            raise InviteError(f"at most {MAX_BOOTSTRAP} bootstrap addresses")
        for address in self.bootstrap:
            _check_address(address)
        if len(self.servers) > MAX_SERVERS:
            raise InviteError(f"at most {MAX_SERVERS} STUN/TURN servers")
        for url in self.servers:
            _check_server(url)
        if self.turn_credential is not None:
            if self.expires is None:
                raise InviteError("only an expiring invite carries a TURN credential")
            credential = self.turn_credential
            if len(credential) != 2 or not all(isinstance(c, str) and 1 <= len(c) <= 200 for c in credential):
                raise InviteError("an invite's TURN credential is [username, password]")

    @property
    def mesh_id(self) -> str:
        return self.mesh if self.mesh is not None else mesh_id_for(self.secret)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now > self.expires

    def expiring(self, expires: int) -> Invite:
        """An invite to the same mesh that members refuse after `expires` (needs the mesh secret)."""
        if self.expires is not None:
            raise InviteError("an expiring invite holds no mesh secret to derive another invite from")
        key = invite_key(self.secret, check_expiry(expires))
        return Invite(self.name, key, self.bootstrap, expires, self.mesh_id, self.servers)

    def with_turn_credential(self, username: str, password: str) -> Invite:
        return replace(self, turn_credential=(username, password))

    @classmethod
    def create(cls, name: str = "shoal", bootstrap: tuple[str, ...] = ()) -> Invite:
        return cls(name=name[:64], secret=secrets.token_bytes(SECRET_BYTES), bootstrap=tuple(bootstrap))

    def with_bootstrap(self, bootstrap: tuple[str, ...]) -> Invite:
        return replace(self, bootstrap=tuple(bootstrap))

    def with_servers(self, servers: tuple[str, ...]) -> Invite:
        return replace(self, servers=tuple(servers))

    def to_token(self) -> str:
        secret = base64.b64encode(self.secret).decode()
        if self.expires is None:
            fields: dict[str, object] = {"n": self.name, "s": secret, "b": list(self.bootstrap)}
        else:
            fields = {"n": self.name, "k": secret, "e": self.expires, "m": self.mesh}
            fields["b"] = list(self.bootstrap)
        if self.servers:
            fields["i"] = list(self.servers)
        if self.turn_credential:
            fields["t"] = list(self.turn_credential)
        body = orjson.dumps(fields)
        checksum = hashlib.sha256(body).digest()[:4]
        return PREFIX + base64.urlsafe_b64encode(body + checksum).decode("ascii").rstrip("=")

    @classmethod
    def from_token(cls, token: str) -> Invite:
        """Parse and validate a token, or a join page URL holding one in its fragment
        (`http://host:port/join#shoal1-…`, see `join_url`); raises `InviteError` with a message the user can
        act on."""
        token = "".join(str(token).split())
        if "#" in token and not token.startswith(PREFIX):
            token = token.split("#", 1)[1]
        if not token.startswith(PREFIX):
            raise InviteError("not a shoal invite (it should start with 'shoal1-')")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InviteError("invite token is too long")
        payload = token[len(PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        except ValueError as exc:
            raise InviteError("invite token is not valid base64url (was it cut off?)") from exc
        if base64.urlsafe_b64encode(raw).decode().rstrip("=") != payload.rstrip("="):
            # a stray character is skipped by the decoder, and a last character may differ only in bits
            # the decoder drops: both decode to the right bytes, but the token was not typed as issued
            raise InviteError("invite token is not valid base64url (mistyped?)")
        body, checksum = raw[:-4], raw[-4:]
        if len(raw) < 5 or hashlib.sha256(body).digest()[:4] != checksum:
            raise InviteError("invite token checksum does not match (was it cut off or mistyped?)")
        try:
            data = orjson.loads(body)
            expires, mesh = data.get("e"), data.get("m")
            name, secret = data["n"], base64.b64decode(data["s" if expires is None else "k"], validate=True)
            bootstrap = tuple(_check_address(a) for a in data.get("b", []))
            servers = tuple(data.get("i", []))
            credential = tuple(data["t"]) if data.get("t") is not None else None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InviteError(f"invite token content is malformed: {exc}") from exc
        if not isinstance(name, str):
            raise InviteError("invite mesh name is not text")
        return cls(
            name=name[:64], secret=secret, bootstrap=bootstrap, expires=expires, mesh=mesh, servers=servers,
            turn_credential=credential,  # type: ignore[arg-type]
        )


def join_url(address: str, token: str) -> str:
    """The join page of the node at `address` (`host:port`) with the invite in the URL fragment, which a
    browser never sends to a server: a phone that scans it becomes a member (`mesh/api/join_page.py`)."""
    return f"http://{address}/join#{token}"


def render_qr(token: str) -> str:
    """The token as a QR code drawn with Unicode half blocks, for phones to scan from a terminal."""
    import io

    import segno

    buffer = io.StringIO()
    segno.make(token, error="m").terminal(out=buffer, compact=True)
    return buffer.getvalue()


def saved_invite_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "mesh" / "invite"


def save_invite(data_dir: str | os.PathLike[str], invite: Invite) -> Path:
    """Keep the invite (it holds the secret: mode 0600) so the node rejoins its mesh after a restart."""
    path = saved_invite_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(invite.to_token())
    return path


def forget_invite(data_dir: str | os.PathLike[str]) -> bool:
    """Remove the saved invite (`shoal mesh leave`); whether there was one."""
    try:
        saved_invite_path(data_dir).unlink()
    except FileNotFoundError:
        return False
    return True


def load_saved_invite(data_dir: str | os.PathLike[str]) -> Invite | None:
    """The invite saved by `save_invite`, or None; raises `InviteError` if the file is damaged."""
    path = saved_invite_path(data_dir)
    try:
        return Invite.from_token(path.read_text())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InviteError(f"cannot read {path}: {exc}") from exc
