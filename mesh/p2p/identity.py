"""The node's identity: an ed25519 key pair stored 0600 in `<data_dir>/identity/`, and the peer id derived
from its public key.

A peer id is `"p"` + lowercase unpadded base32 of `0xed 0x01 || public_key` (the multicodec prefix of an
ed25519 public key), so anyone holding a peer id can verify that peer's signatures without a lookup.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from shoal.mesh.p2p.errors import IdentityError

logger = logging.getLogger(__name__)

KEY_FILE = "ed25519.pem"
NAME_FILE = "name"
_ED25519_PUB_PREFIX = b"\xed\x01"
PEER_ID_LENGTH = 1 + 55  # "p" + base32 of 34 bytes, unpadded
MAX_NAME_LENGTH = 64


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    return base64.b32decode(padded)


def peer_id_from_public_key(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise IdentityError("an ed25519 public key has 32 bytes")
    return "p" + _b32(_ED25519_PUB_PREFIX + public_key)


def default_name(key: Ed25519PrivateKey) -> str:
    """The host name plus the peer id's last four characters: readable, and unique in practice."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{socket.gethostname()[:59]}-{peer_id_from_public_key(raw)[-4:]}"


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw public key inside a peer id; raises `IdentityError` if the id is malformed."""
    if not isinstance(peer_id, str) or len(peer_id) != PEER_ID_LENGTH or not peer_id.startswith("p"):
        raise IdentityError(f"malformed peer id {peer_id!r:.80}")
    try:
        raw = _unb32(peer_id[1:])
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"malformed peer id {peer_id!r:.80}") from exc
    if not raw.startswith(_ED25519_PUB_PREFIX) or len(raw) != 34:
        raise IdentityError(f"peer id {peer_id!r:.80} is not an ed25519 key")
    return raw[2:]


def verify_signature(peer_id: str, signature: bytes, data: bytes) -> bool:
    """True if `signature` over `data` was made by the key behind `peer_id`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
        key.verify(signature, data)
    except (InvalidSignature, IdentityError, ValueError):
        return False
    return True


def clean_name(name: str) -> str:
    """A human name made safe to show: printable, trimmed, at most 64 characters."""
    text = "".join(ch for ch in str(name) if ch.isprintable()).strip()
    return text[:MAX_NAME_LENGTH] or "node"


@dataclass(frozen=True)
class Identity:
    """This node's key pair, peer id and human name."""

    private_key: Ed25519PrivateKey
    name: str

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls, name: str | None = None) -> Identity:
        key = Ed25519PrivateKey.generate()
        return cls(key, clean_name(name or default_name(key)))

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str], name: str | None = None) -> Identity:
        """Load `<data_dir>/identity/ed25519.pem`, creating it (mode 0600) on first start.

        `name` overrides the stored human name; the default is the host name with a short suffix of the
        peer id (`laptop-7qzk`), so nodes on one machine, or machines of one name, stay apart.
        """
        folder = Path(data_dir) / "identity"
        key_path = folder / KEY_FILE
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if key_path.exists():
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                if not isinstance(key, Ed25519PrivateKey):
                    raise IdentityError(f"{key_path} does not hold an ed25519 key")
                if key_path.stat().st_mode & 0o077:
                    logger.warning("identity key %s is readable by others; fixing mode to 0600", key_path)
                    key_path.chmod(0o600)
            else:
                key = Ed25519PrivateKey.generate()
                pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(pem)
                logger.info("created node identity in %s", key_path)
        except (OSError, ValueError) as exc:
            raise IdentityError(f"cannot load or create the identity in {folder}: {exc}") from exc
        name_path = folder / NAME_FILE
        if name is None and name_path.exists():
            name = name_path.read_text(encoding="utf-8")
        return cls(key, clean_name(name or default_name(key)))
