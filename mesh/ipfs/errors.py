"""Domain errors of the IPFS layer. Each is a `IpfsError`, so callers can catch the family."""

from __future__ import annotations


class IpfsError(Exception):
    """Base class for errors of shoal's IPFS layer."""


class InvalidCidError(IpfsError, ValueError):
    """A string or byte sequence that is not a CID shoal can use (malformed, or unsupported codec/hash)."""


class CodecError(IpfsError, ValueError):
    """A block that does not decode as the format its CID names (dag-pb, UnixFS, CAR)."""


class VerificationError(IpfsError):
    """A block whose bytes do not hash to the CID it was requested or offered under."""


class BlockNotFoundError(IpfsError):
    """No source, local or remote, could supply a block."""


class SourceError(IpfsError):
    """One block source failed (unreachable, timed out, bad status, bad data); others may still succeed."""


class GatewayUnreachableError(SourceError):
    """A gateway's address took no connection (refused, unroutable, timed out): as a peer's behind a NAT."""


class PullStalledError(IpfsError):
    """A pull got no new block within its stall timeout (`[ipfs] stall_timeout_s`, `pull --stall-timeout`)."""


class UnknownModelError(IpfsError):
    """A model name that the catalog does not know and that is not a CID."""


class StoreError(IpfsError):
    """The on-disk block store could not read or write."""
