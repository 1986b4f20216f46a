"""CID and multihash helpers on top of `multiformats`: parse, make, verify.

shoal supports the CIDs a UnixFS file import produces: CIDv0 (dag-pb, sha2-256, base58btc) and CIDv1 with
codec `dag-pb` or `raw` and hash `sha2-256`. Blocks are keyed in the store by their multihash, so one block
reached through a CIDv0 and a CIDv1 is stored once.
"""

from __future__ import annotations

import base64
import hashlib

from multiformats import CID, multihash

from mesh.ipfs.errors import InvalidCidError, VerificationError

DAG_PB = "dag-pb"
RAW = "raw"
SHA2_256 = "sha2-256"
SUPPORTED_CODECS = frozenset({DAG_PB, RAW})
# A CIDv1 string longer than this is not one of ours (sha2-256 CIDs are 59 chars in base32).
MAX_CID_TEXT = 200
MAX_BLOCK_SIZE = 2 * 1024 * 1024  # the IPFS bitswap limit; no UnixFS block of ours comes close

__all__ = ["CID", "DAG_PB", "RAW", "block_key", "make_cid", "parse_cid", "verify_block"]


def parse_cid(value: str | bytes | CID) -> CID:
    """Parse and check a CID (text or binary). Raises `InvalidCidError` with a readable reason."""
    if isinstance(value, CID):
        cid = value
    else:
        if isinstance(value, str):
            value = value.strip()
            if not value or len(value) > MAX_CID_TEXT:
                raise InvalidCidError(f"not a CID: {value[:60]!r}")
        try:
            cid = CID.decode(value)
        except Exception as exc:  # multiformats raises several unrelated exception types
            raise InvalidCidError(f"not a CID: {str(value)[:60]!r} ({exc})") from None
    if cid.codec.name not in SUPPORTED_CODECS:
        raise InvalidCidError(f"unsupported CID codec {cid.codec.name!r} in {cid} (need dag-pb or raw)")
    if cid.hashfun.name != SHA2_256:
        raise InvalidCidError(f"unsupported hash {cid.hashfun.name!r} in {cid} (need sha2-256)")
    if len(cid.raw_digest) != 32:
        raise InvalidCidError(f"truncated sha2-256 digest in {cid}")
    return cid


def make_cid(data: bytes, codec: str, version: int) -> CID:
    """The CID of `data` as a block of `codec` (`dag-pb` or `raw`), CIDv0 or CIDv1, sha2-256."""
    digest = multihash.wrap(hashlib.sha256(data).digest(), SHA2_256)
    if version == 0:
        if codec != DAG_PB:
            raise ValueError("CIDv0 can only name dag-pb blocks")
        return CID("base58btc", 0, DAG_PB, digest)
    return CID("base32", 1, codec, digest)


def block_key(cid: CID) -> str:
    """Store key of a block: lowercase base32 of its multihash (same for CIDv0 and CIDv1)."""
    return base64.b32encode(bytes(cid.digest)).decode("ascii").rstrip("=").lower()


def verify_block(cid: CID, data: bytes) -> None:
    """Raise `VerificationError` unless `data` hashes to `cid`'s sha2-256 digest."""
    if len(data) > MAX_BLOCK_SIZE:
        raise VerificationError(f"block {cid} is {len(data)} bytes, over the {MAX_BLOCK_SIZE}-byte limit")
    if hashlib.sha256(data).digest() != bytes(cid.raw_digest):
        raise VerificationError(f"block bytes do not hash to {cid}")
