"""`shoal mesh create|invite|join` and `shoal peers` against real node processes."""

from __future__ import annotations

import stat

import pytest
from shoal.mesh.commands.cli import main
from shoal.mesh.p2p.invite import Invite

from tests.mesh.mesh_nodes import Node, free_port, wait_until

pytestmark = pytest.mark.timeout(120)


def test_mesh_create_prints_and_saves_an_invite(tmp_path, capsys):
    assert (
        main(
            ["mesh", "create", "--name", "home", "--bootstrap", "10.0.0.2:8740", "--data-dir", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    token = out.splitlines()[0]
    invite = Invite.from_token(token)
    assert invite.name == "home" and invite.bootstrap == ("10.0.0.2:8740",)
    assert "█" in out  # the QR code
    saved = tmp_path / "mesh" / "invite"
    assert saved.read_text() == token
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600


def test_bad_invite_is_a_user_error(capsys):
    assert main(["mesh", "join", "not-a-token", "--api", "127.0.0.1:1"]) == 2
    assert "not a shoal invite" in capsys.readouterr().err


def test_invite_join_and_peers_through_running_nodes(tmp_path, capsys):
    token = Invite.create("cli").to_token()
    n1 = Node(
        "n1", tmp_path / "n1", f"127.0.0.1:{free_port()}", ["--invite", token, "--ice", "lo", "--no-mdns"]
    )
    n2 = Node("n2", tmp_path / "n2", f"127.0.0.1:{free_port()}", ["--ice", "lo", "--no-mdns"])
    try:
        n1.start()
        n2.start()
        assert main(["mesh", "invite", "--api", n1.api, "--no-qr"]) == 0
        shown = Invite.from_token(capsys.readouterr().out.strip())
        assert shown.mesh_id == Invite.from_token(token).mesh_id and shown.bootstrap == (n1.api,)

        # n2 is in no mesh yet: it serves only itself until told to join
        assert n2.get("/v1/mesh/peers")["peers"] == []
        assert main(["mesh", "join", shown.to_token(), "--api", n2.api]) == 0
        wait_until(lambda: n1.peer_id in n2.peers(), 30, "n2 joined")

        assert main(["peers", "--api", n2.api]) == 0
        out = capsys.readouterr().out
        assert "n1" in out and n1.peer_id[:20] in out
        assert "host/udp" in out  # loopback: the link's selected ICE pair is host to host, over UDP
        path = n2.peers()[n1.peer_id]["path"]
        assert path["type"] == "host" and (path["local"], path["remote"]) == ("host", "host"), path
        assert path["remote_address"].startswith("127.0.0.1:") and path["protocol"] == "udp"
        # the joined invite is saved: after a restart n2 is still a member and relinks by itself
        n2.kill(15)
        n2.start()
        wait_until(lambda: n1.peer_id in n2.peers(), 30, "n2 relinked after restart")
    finally:
        n1.kill(15)
        n2.kill(15)
