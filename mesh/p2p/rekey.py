"""Handing the mesh secret to members over their links, and rotating it.

- A joiner that proved only an expiring invite's key (see `mesh.p2p.invite`) is sent the mesh secret by the
  member it linked to, so it stays a member after the invite expires.
- `rotate()` (`POST /v1/mesh/rotate`, `shoal mesh rotate`): a new random secret, adopted here and sent to
  every member linked now; each passes it on to its own members. Invites made from the old secret, and nodes
  that were away, are refused afterwards (a different mesh id: `foreign_mesh`); give those a new invite.

Frame `mesh.key` (request, over the DTLS-encrypted control channel): `{"secret": base64, "name": mesh name,
"rotate": bool, "previous": mesh id (rotations)}`. It is accepted only from a peer that proved, in signalling,
the mesh secret or the invite this node holds (`Peer.admitted`), never from one admitted by the allow-list
alone; `rotate: false` must name the mesh this node is in, a rotation must start from it (`previous`). Two
rotations of one mesh at once converge: a node that rotated from the same `previous` takes the other secret
if its mesh id sorts first, else answers `stale_rotation`. Any member can thus rotate the secret, as any
member could share it.
The receiver saves the secret (`<data_dir>/mesh/invite`, 0600) and, on rotation, lists the old mesh id in
`<data_dir>/mesh/superseded`, so that a configured invite to the old mesh does not win after a restart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.errors import InviteError, MeshError, RemoteError
from shoal.mesh.p2p.invite import SECRET_BYTES, Invite, load_saved_invite, mesh_id_for, save_invite
from shoal.mesh.p2p.peer import Peer

if TYPE_CHECKING:
    from shoal.mesh.p2p.service import MeshService

logger = logging.getLogger(__name__)
KEY_FRAME = "mesh.key"
MAX_SUPERSEDED = 32
HOLDERS = ("secret", "invite")
"""`Peer.admitted` values of peers that proved a secret-derived key (and may send or get `mesh.key`)."""


def superseded_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "mesh" / "superseded"


def load_superseded(data_dir: str | os.PathLike[str]) -> list[str]:
    """Mesh ids this node rotated away from (newest last); [] if none or unreadable."""
    try:
        ids = orjson.loads(superseded_path(data_dir).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return []
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def add_superseded(data_dir: str | os.PathLike[str], mesh_id: str) -> None:
    ids = [i for i in load_superseded(data_dir) if i != mesh_id] + [mesh_id]
    path = superseded_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(orjson.dumps(ids[-MAX_SUPERSEDED:]))


def starting_invite(config: MeshConfig, data_dir: str | os.PathLike[str]) -> tuple[Invite | None, bool]:
    """The invite a node starts with, and whether it is the saved one: the configured secret/invite, unless
    the saved invite replaces it (the configured mesh was rotated away from, or the configured invite is
    an expiring one and the saved one holds that mesh's secret); the saved invite when none is configured."""
    configured: Invite | None = None
    if config.secret:
        configured = Invite(_configured_name(config), config.secret_bytes() or b"")
    elif config.invite:
        configured = Invite.from_token(config.invite)
    try:
        saved = load_saved_invite(data_dir)
    except MeshError as exc:
        logger.warning("ignoring the saved invite: %s", exc)
        saved = None
    if saved is not None and (
        configured is None
        or configured.mesh_id in load_superseded(data_dir)
        or (configured.expires is not None and saved.expires is None and saved.mesh_id == configured.mesh_id)
    ):
        return saved, True
    if configured is not None and configured.expired(time.time()):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(configured.expires or 0))
        logger.warning("the configured invite expired at %s: members will refuse this node", when)
    return configured, False


def _configured_name(config: MeshConfig) -> str:
    return Invite.from_token(config.invite).name if config.invite else "shoal"


class Rekey:
    """The `mesh.key` handler and sender of one `MeshService`."""

    def __init__(self, service: MeshService) -> None:
        self.service = service
        self.forked_from: str | None = None
        """The mesh id this node's last rotation started from."""
        service.on_control(KEY_FRAME, self._on_key)
        service.add_peer_listener(self._on_peer)

    def _on_peer(self, event: str, peer: Peer) -> None:
        if event == "joined" and peer.admitted == "invite" and self.service.membership.has_mesh_secret:
            self.service.spawn(self._hand_over(peer), name=f"mesh.key {peer.peer_id[:12]}")

    async def _hand_over(self, peer: Peer) -> None:
        try:
            await self._send(peer, rotate=False)
            peer.holds_secret()
            logger.info(
                "mesh: sent the mesh secret to %s (joined with an expiring invite)", peer.peer_id[:12]
            )
        except MeshError as exc:
            logger.warning("mesh: could not send the mesh secret to %s: %s", peer.peer_id[:12], exc)

    async def _send(self, peer: Peer, rotate: bool) -> dict[str, Any]:
        membership = self.service.membership
        if not membership.has_mesh_secret or membership.secret is None:
            raise InviteError("this node holds no mesh secret")
        body: dict[str, Any] = {
            "secret": base64.b64encode(membership.secret).decode("ascii"),
            "name": self.service.mesh_name,
            "rotate": rotate,
        }
        if rotate:
            body["previous"] = self.forked_from
        return await peer.request(KEY_FRAME, body)

    async def rotate(self) -> dict[str, Any]:
        """Adopt a new random secret and send it to every member linked now; `{"mesh", "previous",
        "rekeyed": [peer ids], "failed": [{"id", "reason"}]}`."""
        previous = self.service.membership
        if not previous.has_mesh_secret:
            raise InviteError("this node holds no mesh secret to rotate (not in a mesh, or an invite only)")
        await self._adopt(secrets.token_bytes(SECRET_BYTES), self.service.mesh_name, previous.mesh_id)
        rekeyed, failed = await self._pass_on(exclude=None)
        mesh = self.service.membership.mesh_id
        return {"mesh": mesh, "previous": previous.mesh_id, "rekeyed": rekeyed, "failed": failed}

    async def _pass_on(self, exclude: str | None) -> tuple[list[str], list[dict[str, str]]]:
        peers = [
            peer
            for peer in self.service.connected_peers()
            if peer.admitted in HOLDERS and peer.peer_id != exclude
        ]
        sends = (self._send(peer, rotate=True) for peer in peers)
        results = await asyncio.gather(*sends, return_exceptions=True)
        rekeyed, failed = [], []
        for peer, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, MeshError):
                    raise result
                failed.append({"id": peer.peer_id, "reason": str(result)[:300]})
            else:
                rekeyed.append(peer.peer_id)
        return rekeyed, failed

    async def _adopt(self, secret: bytes, name: str, forked_from: str | None) -> None:
        """Take `secret` as the mesh secret and save it; `forked_from`: a rotation from that mesh id."""
        service = self.service
        old = service.adopt_secret(secret, name)
        if forked_from is not None:
            self.forked_from = forked_from
        bootstrap = tuple(a for a, t in service.discovery.targets.items() if t.bootstrap)[:16]
        await asyncio.to_thread(save_invite, service.data_dir, Invite(name, secret, bootstrap))
        if forked_from is not None:
            await asyncio.to_thread(add_superseded, service.data_dir, old.mesh_id)
        how = "rotated" if forked_from is not None else "received"
        logger.info("mesh: %s the mesh secret (mesh %s)", how, service.membership.mesh_id)
        service.events.publish("mesh.rekeyed", mesh=service.membership.mesh_id, previous=old.mesh_id)
        if service.membership.mesh_id != old.mesh_id:
            service.spawn(service.discovery.mesh_changed(), name="mdns update")

    async def _on_key(self, peer: Peer, frame: p.ControlFrame) -> dict[str, Any]:
        body = frame.body
        secret_text, name, rotate = body.get("secret"), body.get("name"), body.get("rotate")
        if not isinstance(secret_text, str) or not isinstance(name, str) or not isinstance(rotate, bool):
            raise p.ProtocolError("mesh.key needs a base64 secret, a name and a rotate flag")
        previous = body.get("previous")
        if rotate and (not isinstance(previous, str) or not 0 < len(previous) <= 64):
            raise p.ProtocolError("a rotating mesh.key names the previous mesh id")
        try:
            secret = base64.b64decode(secret_text, validate=True)
        except (ValueError, binascii.Error):
            raise p.ProtocolError("mesh.key secret is not base64") from None
        if not 16 <= len(secret) <= 64:
            raise p.ProtocolError("mesh.key secret must have 16 to 64 bytes")
        membership = self.service.membership
        if not (peer.admitted == "secret" or (peer.admitted == "invite" and not membership.has_mesh_secret)):
            raise RemoteError("forbidden", "only a peer that proved the mesh secret may send it")
        new_id = mesh_id_for(secret)
        if membership.has_mesh_secret and new_id == membership.mesh_id:
            return {"mesh": new_id, "changed": False}
        if not rotate and new_id != membership.mesh_id:
            message = f"that secret is for mesh {new_id}, this node is in {membership.mesh_id}"
            raise RemoteError("wrong_mesh", message)
        if rotate and previous != membership.mesh_id:
            if not (previous == self.forked_from and new_id < membership.mesh_id):
                message = f"a rotation from mesh {previous}, this node is in {membership.mesh_id}"
                raise RemoteError("stale_rotation", message)
            previous = self.forked_from  # two rotations at once: the smaller mesh id wins everywhere
        await self._adopt(secret, name.strip()[:64] or "shoal", previous if rotate else None)
        peer.holds_secret()
        if rotate:
            self.service.spawn(self._pass_on(exclude=peer.peer_id), name="mesh.key pass on")
        return {"mesh": new_id, "changed": True}
