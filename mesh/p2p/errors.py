"""Domain errors of the mesh layer (identity, invites, wire protocol, signalling, links)."""

from __future__ import annotations


class MeshError(Exception):
    """Base class of every mesh-layer error."""


class IdentityError(MeshError):
    """The node identity could not be loaded or created, or a peer id is malformed."""


class InviteError(MeshError):
    """An invite token is malformed, truncated, or has a bad checksum."""


class ProtocolError(MeshError):
    """A peer sent a frame that does not decode, is of an unknown type, or exceeds its size limit."""


class SignallingError(MeshError):
    """A signalling message is malformed, badly signed, stale, or the sender is not a mesh member.

    `code` names the reason in a refusal sent back to the sender (`invalid_signal`, `stale`, `replayed`,
    `bad_signature`, `banned`, `too_many_peers`, `glare`, `not_in_mesh`, ...)."""

    code = "invalid_signal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class MembershipError(SignallingError):
    """The sender proved neither the mesh secret (or a current invite to it) nor a place on the allow-list.
    Codes: `not_member`, `foreign_mesh`, `invite_expired`."""

    code = "not_member"


class JoinRefused(SignallingError):
    """A member refused this node's offer; `code` is the member's reason code, `by` the address asked."""

    def __init__(self, message: str, code: str, by: str) -> None:
        super().__init__(message, code)
        self.by = by


class PeerUnavailable(MeshError):
    """No live link to the requested peer."""


class LinkClosed(PeerUnavailable):
    """The link closed while an operation on it was pending."""


class RequestTimeout(MeshError):
    """A peer did not answer a request in time."""


class RemoteError(MeshError):
    """A peer answered a request with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
