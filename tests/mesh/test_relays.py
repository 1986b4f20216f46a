"""TURN credentials and TURN checks (`mesh.p2p.relays`) without namespaces: the REST-style credential
arithmetic, which credentials a node uses, and the coded reasons of checks that cannot succeed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
import time

import orjson
import pytest
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.errors import InviteError
from shoal.mesh.p2p.invite import Invite
from shoal.mesh.p2p.relays import Relays, RelayStatus, rest_credentials, turn_secret
from shoal.mesh.p2p.service import MeshService
from shoal.mesh.p2p.signalling import Membership


def test_rest_credentials_follow_coturns_scheme() -> None:
    username, password = rest_credentials("s3cret", "mabc", ttl_s=600, now=1_000_000.4)
    assert username == "1000600:mabc"
    expected = hmac.new(b"s3cret", b"1000600:mabc", hashlib.sha1).digest()
    assert base64.b64decode(password) == expected


def test_turn_secret_is_per_mesh_and_reveals_nothing_of_the_secret() -> None:
    a, b = Invite.create("a"), Invite.create("b")
    assert turn_secret(a.secret) == turn_secret(a.secret) != turn_secret(b.secret)
    assert a.secret.hex() not in turn_secret(a.secret)


def test_credentials_static_then_mesh_then_none() -> None:
    invite = Invite.create("m")
    membership = Membership.from_invite(invite)
    static = Relays(MeshConfig(turn=["turn:203.0.113.1:3478"], turn_username="u", turn_password="p"),
                    lambda: membership)
    assert static.credentials() == ("u", "p", "static")
    derived = Relays(MeshConfig(turn=["turn:203.0.113.1:3478"]), lambda: membership)
    username, _, kind = derived.credentials()
    assert kind == "mesh" and username.endswith(":" + membership.mesh_id)
    assert rest_credentials(turn_secret(invite.secret), membership.mesh_id, now=0)[0] != username
    expiring = Membership.from_invite(invite.expiring(2_000_000_000))
    assert Relays(MeshConfig(turn=["turn:203.0.113.1:3478"]), lambda: expiring).credentials()[2] == "none"
    assert Relays(MeshConfig(), lambda: membership).credentials()[2] == "none"


def test_checks_that_cannot_succeed_say_why() -> None:
    with socket.socket() as sock:  # a loopback TCP port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"turn:127.0.0.1:{port}?transport=tcp"
    relays = Relays(MeshConfig(turn=[url], turn_username="u", turn_password="p"), Membership)
    assert relays.view()["turn"][0]["ok"] is None  # not checked yet
    status = asyncio.run(relays.check(url))
    assert (status.ok, status.code, status.credentials) == (False, "unreachable", "static"), status
    assert f"127.0.0.1:{port} (tcp) unreachable" in (status.reason or "")
    assert relays.view()["turn"][0]["code"] == "unreachable"


@pytest.mark.parametrize("key, url", [("turn", "turn:203.0.113.1:port"), ("turn", "stun:203.0.113.1"),
                                      ("stun", "turn:203.0.113.1"), ("stun", "http://203.0.113.1")])
def test_malformed_server_urls_are_refused_by_the_config(key: str, url: str) -> None:
    with pytest.raises(ValueError, match=f"{key}: "):
        MeshConfig(**{key: [url]})


def test_invite_carries_the_mesh_servers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    servers = ("stun:203.0.113.1:3478", "turn:203.0.113.1:3478?transport=tcp")
    invite = Invite.create("m").with_servers(servers)
    again = Invite.from_token(invite.to_token())
    assert again.servers == servers and again.secret == invite.secret
    assert again.expiring(2_000_000_000).servers == servers
    assert "i" not in orjson.loads(_body(Invite.create("plain").to_token()))  # old tokens stay as they were
    for bad in ("http://x", "turn: spaced", "s" * 300):
        with pytest.raises(InviteError):
            Invite.create("m").with_servers((bad,))
    # a member passes on its config's servers and its invite's in the invites it makes
    config = MeshConfig(invite=invite.to_token(), stun=["stun:198.51.100.9:3478"])
    service = MeshService(config, None, tmp_path)
    made = service.invite()
    assert made is not None and made.servers == ("stun:198.51.100.9:3478", *servers)
    assert service.relays.stun == ["stun:198.51.100.9:3478", servers[0]]
    assert service.relays.turn == [servers[1]]


def _body(token: str) -> bytes:
    payload = token.removeprefix("shoal1-")
    return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))[:-4]


def test_cli_creates_invites_with_servers_and_prints_relay_settings(capsys) -> None:  # type: ignore[no-untyped-def]
    from shoal.mesh.commands.cli import main

    assert main(["mesh", "create", "--server", "turn:203.0.113.1:3478", "--no-qr"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[0]
    invite = Invite.from_token(token)
    assert invite.servers == ("turn:203.0.113.1:3478",)
    assert main(["mesh", "relay", token]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"static-auth-secret={turn_secret(invite.secret)}" in lines and "use-auth-secret" in lines
    assert main(["mesh", "relay", invite.expiring(2_000_000_000).to_token()]) != 0
    assert "no mesh secret" in capsys.readouterr().err
    assert main(["mesh", "create", "--server", "http://203.0.113.1", "--no-qr"]) != 0


def test_a_failing_turn_server_does_not_hide_a_working_one() -> None:
    udp, tcp = "turn:203.0.113.1:3478", "turn:203.0.113.1:3478?transport=tcp"
    relays = Relays(MeshConfig(turn=[udp, tcp], turn_username="u", turn_password="p"), Membership)
    assert relays.usable_turn() == [udp, tcp]  # not checked yet: all of them, in order
    relays.status[udp] = RelayStatus(udp, ok=False, code="timeout")
    assert relays.usable_turn() == [tcp]
    servers = relays.rtc_configuration().iceServers
    assert [s.urls for s in servers] == [tcp] and servers[0].username == "u"
    relays.status[udp] = RelayStatus(udp, ok=True)
    assert relays.usable_turn() == [udp, tcp]


def test_an_expiring_invite_carries_a_turn_credential_that_expires_with_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    invite = Invite.create("m")
    expires = int(time.time()) + 3600
    turn = "turn:203.0.113.1:3478"
    member = MeshService(MeshConfig(invite=invite.to_token(), turn=[turn]), None, tmp_path / "member")
    made = member.invite(expires=expires)
    assert made is not None and made.expires == expires and made.servers == (turn,)
    secret = turn_secret(invite.secret)
    assert made.turn_credential == rest_credentials(secret, invite.mesh_id, expiry=expires)
    assert made.turn_credential[0] == f"{expires}:{invite.mesh_id}"
    again = Invite.from_token(made.to_token())
    assert again.turn_credential == made.turn_credential
    # the joiner holds no mesh secret: it uses the invite's credential, and its own invites pass it on
    joiner = MeshService(MeshConfig(invite=made.to_token()), None, tmp_path / "joiner")
    assert joiner.relays.credentials() == (*made.turn_credential, "invite")
    passed_on = joiner.invite()
    assert passed_on is not None and passed_on.turn_credential == made.turn_credential
    # a mesh with no TURN server gives no credential; a non-expiring invite never carries one
    plain_node = MeshService(MeshConfig(invite=invite.to_token()), None, tmp_path / "plain")
    plain = plain_node.invite(expires=expires)
    assert plain is not None and plain.turn_credential is None
    with pytest.raises(InviteError, match="only an expiring invite"):
        invite.with_turn_credential("u", "p")
    with pytest.raises(InviteError, match="username, password"):
        made.with_turn_credential("u", "")


def test_an_expired_invite_credential_is_not_used() -> None:
    invite = Invite.create("m")
    old = invite.expiring(int(time.time()) - 10).with_turn_credential("1:m", "p")
    relays = Relays(MeshConfig(turn=["turn:203.0.113.1:3478"]), lambda: Membership.from_invite(old),
                    lambda: old)
    assert relays.credentials()[2] == "none"


def test_a_node_reports_an_unreachable_turn_server(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from shoal.mesh.commands.cli import main

    from tests.mesh.mesh_nodes import Node, free_port, wait_until

    dead = f"turn:127.0.0.1:{free_port()}?transport=tcp"  # nobody listens there
    token = Invite.create("t").to_token()
    node = Node("t", tmp_path / "t", f"127.0.0.1:{free_port()}",
                ["--invite", token, "--ice", "lo", "--no-mdns", "--turn", dead, "--turn-username", "u",
                 "--turn-password", "p"]).start()
    try:
        def checked() -> dict | None:
            status = node.get("/v1/mesh/peers")["ice"]["turn"][0]
            return status if status["ok"] is not None else None

        check = wait_until(checked, 20, "the TURN check")
        assert check["url"] == dead and check["ok"] is False and check["code"] == "unreachable", check
        assert main(["peers", "--api", node.api]) == 0
        assert f"TURN {dead} unusable (unreachable)" in capsys.readouterr().out
    finally:
        node.kill(15)
