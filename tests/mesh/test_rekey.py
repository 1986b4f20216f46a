"""`mesh.key` on one node (a real `MeshService` and `Peer`, no link): who may hand over or rotate the secret,
and two rotations of one mesh at once converging on the smaller mesh id."""

from __future__ import annotations

import base64
import secrets

import pytest
from aiortc import RTCPeerConnection
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.errors import RemoteError
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.p2p.invite import Invite, load_saved_invite, mesh_id_for
from shoal.mesh.p2p.peer import LinkSettings, Peer
from shoal.mesh.p2p.rekey import load_superseded, starting_invite
from shoal.mesh.p2p.service import MeshService


def _key_frame(secret: bytes, rotate: bool, previous: str | None = None) -> p.ControlFrame:
    body = {"secret": base64.b64encode(secret).decode(), "name": "r", "rotate": rotate}
    if previous is not None:
        body["previous"] = previous
    return p.ControlFrame("mesh.key", body, id=1)


def _secret_with_id(below: str | None = None, above: str | None = None) -> bytes:
    while True:
        secret = secrets.token_bytes(32)
        mesh = mesh_id_for(secret)
        if (below is None or mesh < below) and (above is None or mesh > above):
            return secret


async def test_rotations_handovers_and_who_may_send_them(tmp_path):
    invite = Invite.create("r")
    config = MeshConfig(invite=invite.to_token(), mdns=False)
    service = MeshService(config, Identity.generate("b"), tmp_path)
    peer = Peer(
        RTCPeerConnection(),
        Identity.generate("a").peer_id,
        "a",
        True,
        LinkSettings(),
        service.handlers,
        lambda *a: None,
        lambda *a: None,
    )
    on_key = service.handlers.control["mesh.key"]
    try:
        m0 = service.membership.mesh_id
        peer.admitted = "allow"  # allow-listed only: proved no secret
        with pytest.raises(RemoteError) as forbidden:
            await on_key(peer, _key_frame(secrets.token_bytes(32), True, m0))
        assert forbidden.value.code == "forbidden" and service.membership.mesh_id == m0

        peer.admitted = "secret"
        with pytest.raises(RemoteError) as wrong:
            await on_key(peer, _key_frame(secrets.token_bytes(32), False))
        assert wrong.value.code == "wrong_mesh"
        assert await on_key(peer, _key_frame(invite.secret, False)) == {"mesh": m0, "changed": False}
        with pytest.raises(p.ProtocolError):
            await on_key(peer, _key_frame(secrets.token_bytes(32), True))  # a rotation names its start

        # this node rotates (nobody linked), and meanwhile a peer rotated the same mesh to another secret
        m2 = (await service.rotate())["mesh"]
        assert m2 != m0 and load_superseded(tmp_path) == [m0]
        larger = _secret_with_id(above=m2)
        with pytest.raises(RemoteError) as stale:
            await on_key(peer, _key_frame(larger, True, m0))
        assert stale.value.code == "stale_rotation" and service.membership.mesh_id == m2
        smaller = _secret_with_id(below=m2)
        reply = await on_key(peer, _key_frame(smaller, True, m0))
        assert reply == {"mesh": mesh_id_for(smaller), "changed": True}
        assert service.membership.mesh_id == mesh_id_for(smaller)
        with pytest.raises(RemoteError):  # a rotation from a mesh this node was never in
            await on_key(peer, _key_frame(secrets.token_bytes(32), True, "mnotthisone"))

        # after a restart the saved secret wins over the configured invite to the old mesh
        assert load_saved_invite(tmp_path).secret == smaller
        assert starting_invite(config, tmp_path) == (load_saved_invite(tmp_path), True)
    finally:
        await peer.close("done")
