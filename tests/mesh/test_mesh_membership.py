"""Membership that lasts, with real `shoal node` processes: `--join` keeps the invite (a restart without the
flag rejoins), a runtime join keeps the mesh's name, and `shoal mesh leave` forgets the mesh (CLI and API,
local clients only)."""

from __future__ import annotations

import pytest
from shoal.mesh.commands.cli import main
from shoal.mesh.p2p.invite import Invite

from tests.mesh.mesh_nodes import wait_until
from tests.nodes import NodeProcess

pytestmark = pytest.mark.timeout(180)

NO_MODEL = {"models": {"preload": False}}


def linked(node: NodeProcess, other: NodeProcess) -> bool:
    peers = node.get("/v1/mesh/peers")["peers"]
    return any(p["id"] == other.peer_id and p["state"] == "connected" for p in peers)


def test_join_persists_keeps_the_name_and_leave_forgets(tmp_path, capsys):
    token = Invite.create("attic").to_token()
    hub = NodeProcess("hub", tmp_path / "hub", {**NO_MODEL, "mesh": {"invite": token}})
    member = NodeProcess("member", tmp_path / "member", NO_MODEL)
    try:
        hub.start()
        token = hub.get("/v1/mesh/invite")["invite"]  # names the hub as bootstrap
        member.args = ["--join", token]
        member.start()
        wait_until(lambda: linked(member, hub), 60, "the --join node linked")
        assert (tmp_path / "member" / "mesh" / "invite").read_text() == token
        member.stop()
        member.args = []  # no --join: the kept invite brings it back
        member.start()
        wait_until(lambda: linked(member, hub), 60, "relinked after a restart without --join")
        own = member.get("/v1/mesh/peers")["self"]
        assert own["mesh_name"] == "attic" and own["mesh"] == Invite.from_token(token).mesh_id

        assert main(["mesh", "leave", "--api", member.api]) == 0
        assert "left mesh" in capsys.readouterr().out
        view = member.get("/v1/mesh/peers")
        assert view["self"]["mesh"] is None and view["mesh"]["status"] == "none", view
        assert not (tmp_path / "member" / "mesh" / "invite").exists()
        wait_until(lambda: not linked(hub, member), 30, "the hub saw the member go")
        again = member.post("/v1/mesh/leave", {})
        assert again["left"] is None and again["configured"] is False

        # a runtime join keeps the mesh's name (and is kept for restarts)
        joined = member.post("/v1/mesh/join", {"invite": hub.get("/v1/mesh/invite")["invite"]})
        assert joined["name"] == "attic", joined
        wait_until(lambda: linked(member, hub), 60, "relinked after a runtime join")
        assert Invite.from_token(member.get("/v1/mesh/invite")["invite"]).name == "attic"
        member.stop()
        member.start()
        assert member.get("/v1/mesh/peers")["self"]["mesh_name"] == "attic"
    finally:
        member.stop()
        hub.stop()
