"""Invites that expire, a rotated mesh secret, and refusals the joiner sees — real node processes (the mesh
harness) linked over aiortc on loopback; and the mesh id a node announces over mDNS after a join or a
rotation."""

from __future__ import annotations

import asyncio
import time

import pytest
from shoal.mesh.commands.cli import main
from shoal.mesh.p2p.discovery import SERVICE_TYPE
from shoal.mesh.p2p.invite import Invite, load_saved_invite
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from tests.mesh.mesh_nodes import Node, free_port, wait_until

pytestmark = pytest.mark.timeout(180)
LOOPBACK = ["--ice", "lo", "--no-mdns"]


def _node(base, name: str, args: list[str]) -> Node:
    return Node(name, base / name, f"127.0.0.1:{free_port()}", [*LOOPBACK, *args])


def _standing(node: Node) -> dict:
    return node.get("/v1/mesh/peers")["mesh"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    base = tmp_path_factory.mktemp("invites")
    invite = Invite.create("inv")
    node = _node(base, "hub", ["--invite", invite.to_token()]).start()
    nodes = [node]
    try:
        yield {"hub": node, "invite": invite, "base": base, "nodes": nodes}
    finally:
        for each in nodes:
            each.kill(15)


def test_expired_invite_is_refused_visibly_and_the_joiner_backs_off(hub, capsys):
    node = hub["hub"]
    expired = hub["invite"].expiring(int(time.time()) - 60).with_bootstrap((node.api,))
    # a running node will not take an expired invite at all
    assert node.post("/v1/mesh/join", {"invite": expired.to_token()})["error"]["code"] == "invite_expired"

    joiner = _node(hub["base"], "late", ["--invite", expired.to_token(), "--refused-retry-max", "4"]).start()
    hub["nodes"].append(joiner)
    seen: dict[int, float] = {}

    def refused_three_times() -> bool:
        standing = _standing(joiner)
        if standing["status"] == "refused":
            seen.setdefault(standing["refusals"], standing["backoff_s"])
        return standing["refusals"] >= 3

    wait_until(refused_three_times, 40, "three refusals")
    standing = _standing(joiner)
    assert standing["status"] == "refused" and standing["code"] == "invite_expired", standing
    assert "expired" in standing["reason"] and standing["by"] == node.api
    assert standing["next_retry"] > standing["at"] and standing["links"] == 0
    # the wait doubles per refusal (1, 2, 4 s) up to the cap, instead of a fixed rate
    assert sorted(seen.items())[:3] == [(1, 1.0), (2, 2.0), (3, 4.0)], seen
    refused = [r for r in node.get("/v1/mesh/peers")["refused"] if r["from"] == joiner.peer_id]
    assert refused and "expired" in refused[-1]["reason"]
    assert joiner.peer_id not in node.peers()
    assert main(["peers", "--api", joiner.api]) == 0
    assert f"refused by {node.api} (invite_expired): " in capsys.readouterr().out
    joiner.kill(15)


def test_current_invite_joins_and_the_member_hands_over_the_secret(hub, capsys):
    node = hub["hub"]
    assert main(["mesh", "invite", "--api", node.api, "--no-qr", "--expires", "1h"]) == 0
    printed = capsys.readouterr().out.split()
    token = Invite.from_token(printed[0])
    assert printed[1] == "expires" and 3500 < token.expires - time.time() <= 3600
    body = node.get("/v1/mesh/invite?expires_in=3600")
    token = Invite.from_token(body["invite"])
    assert token.expires == body["expires"] and token.mesh_id == hub["invite"].mesh_id
    assert token.secret != hub["invite"].secret and token.bootstrap == (node.api,)
    assert node.post_get("/v1/mesh/invite?expires_in=0")["error"]["code"] == "invalid_expiry"

    member = _node(hub["base"], "member", ["--invite", body["invite"]]).start()
    hub["nodes"].append(member)
    hub["member"] = member
    wait_until(lambda: node.peer_id in member.peers(), 30, "member link")
    # the hub sends the mesh secret over the link; the member saves it (so it outlives the invite)
    wait_until(lambda: member.peers()[node.peer_id]["admitted"] == "secret", 20, "mesh secret handed over")
    saved = load_saved_invite(member.data_dir)
    assert saved.expires is None and saved.secret == hub["invite"].secret
    assert _standing(member)["status"] == "linked"


def test_rotation_rekeys_members_and_refuses_the_old_invite(hub, capsys):
    node, member = hub["hub"], hub["member"]
    old_mesh = hub["invite"].mesh_id
    wait_until(lambda: node.peer_id in member.peers(), 30, "member link")
    assert main(["mesh", "rotate", "--api", node.api, "--no-qr"]) == 0
    printed = capsys.readouterr().out.splitlines()
    new = Invite.from_token(printed[-1])
    assert f"mesh {old_mesh} is now {new.mesh_id}; re-keyed 1 linked member(s)" in printed[0]
    result = {"mesh": new.mesh_id}
    assert new.mesh_id != old_mesh and new.secret != hub["invite"].secret
    assert node.get("/v1/mesh/peers")["self"]["mesh"] == new.mesh_id
    assert member.get("/v1/mesh/peers")["self"]["mesh"] == result["mesh"]
    assert node.peer_id in member.peers()  # the link stays up
    assert load_saved_invite(member.data_dir).secret == new.secret

    # the member rejoins after a restart with the new secret, though its config still names the old invite
    member.kill(15)
    wait_until(lambda: member.peer_id not in node.peers(), 20, "member gone")
    member.start()
    wait_until(lambda: member.peer_id in node.peers(), 30, "member back")
    assert member.get("/v1/mesh/peers")["self"]["mesh"] == result["mesh"]

    # a node holding the old invite is refused, and sees why
    stale = _node(hub["base"], "stale", ["--invite", hub["invite"].with_bootstrap((node.api,)).to_token()])
    stale.start()
    hub["nodes"].append(stale)
    wait_until(lambda: _standing(stale)["status"] == "refused", 30, "refusal of the old invite")
    standing = _standing(stale)
    assert standing["code"] == "foreign_mesh" and result["mesh"] in standing["reason"], standing
    assert stale.peer_id not in node.peers()


async def _announced_mesh(peer_id: str, timeout_s: float = 20.0) -> str | None:
    """The `mesh` TXT value a node announces over mDNS on loopback (None until it announces one)."""
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        info = AsyncServiceInfo(SERVICE_TYPE, f"{peer_id[:20]}.{SERVICE_TYPE}")
        if not await info.async_request(zc.zeroconf, int(timeout_s * 1000)):
            return None
        value = info.properties.get(b"mesh")
        return value.decode() if value else None
    finally:
        await zc.async_close()


def test_mdns_announces_the_mesh_after_a_join_and_a_rotation(tmp_path):
    node = Node("lan", tmp_path / "lan", f"127.0.0.1:{free_port()}", ["--ice", "lo"]).start()
    try:
        invite = Invite.create("lan")
        assert node.post("/v1/mesh/join", {"invite": invite.to_token()})["mesh"] == invite.mesh_id
        seen = wait_until(lambda: asyncio.run(_announced_mesh(node.peer_id, 2.0)), 30, "announcement")
        assert seen == invite.mesh_id
        rotated = node.post("/v1/mesh/rotate", {})["mesh"]
        wait_until(lambda: asyncio.run(_announced_mesh(node.peer_id, 2.0)) == rotated, 30, "new mesh id")
    finally:
        node.kill(15)
