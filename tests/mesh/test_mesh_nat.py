"""Members behind NATs (network namespaces this test makes, as root; coturn as the STUN/TURN server): they
meet through a reachable bootstrap member (peer exchange relays their signalling), then link directly by
hole punching, or through TURN, and `/v1/mesh/peers` says which. Skipped visibly without root, iptables or
coturn (`scripts/install.sh test` installs the last two where apt is available)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from shoal.mesh.p2p.invite import Invite
from shoal.mesh.p2p.relays import turn_secret

from tests.mesh import nat_netns
from tests.mesh.mesh_nodes import Node, wait_until

pytestmark = [pytest.mark.timeout(120)]
_why_not = nat_netns.available()
STUN = f"stun:{nat_netns.SERVER}:{nat_netns.TURN_PORT}"
TURN_USER, TURN_PASSWORD = "shoal", "shoal-pass"


def _nat(base: Path, nat1: str, nat2: str, secret: str | None = None) -> Iterator[nat_netns.NatNetwork]:
    if _why_not:
        pytest.skip(f"NAT namespaces unavailable: {_why_not}")
    network = nat_netns.NatNetwork(prefix=f"sn{os.getpid() % 100000}").setup(nat1, nat2)
    try:
        network.start_turn(base, secret=secret)
        yield network
    finally:
        network.close()


def _start(network: nat_netns.NatNetwork, base: Path, turn: list[str], user: str | None = TURN_USER,
           password: str | None = TURN_PASSWORD, invite: Invite | None = None) -> list[Node]:
    token = (invite or Invite.create("nat")).to_token()
    ice = ["--stun", STUN, *(a for url in turn for a in ("--turn", url))] if not invite else []
    if user is not None and password is not None:
        ice += ["--turn-username", user, "--turn-password", password]
    public = f"{nat_netns.PUBLIC_HOST}:8740"
    plan = [
        ("pub", network.public_host, public, []),
        ("home1", network.home(1), f"{network.home_address(1)}:8740", ["--bootstrap", public]),
        ("home2", network.home(2), f"{network.home_address(2)}:8740", ["--bootstrap", public]),
    ]
    nodes: list[Node] = []
    try:
        for name, namespace, api, extra in plan:
            prefix = network.exec_prefix(namespace)
            args = ["--invite", token, "--no-mdns", *ice, *extra]
            nodes.append(Node(name, base / name, api, args, prefix=prefix, http_prefix=prefix).start())
    except BaseException:
        for node in nodes:
            node.kill(15)
        raise
    return nodes


def _linked(a: Node, b: Node) -> dict | None:
    view = a.peers().get(b.peer_id)
    return view if view and view.get("path") else None


def _mesh(tmp_path: Path, nat1: str, nat2: str, turn: list[str], secret: str | None = None,
          **credentials: object) -> Iterator[list[Node]]:
    for network in _nat(tmp_path, nat1, nat2, secret):
        nodes = _start(network, tmp_path, turn, **credentials)  # type: ignore[arg-type]
        try:
            yield nodes
        finally:
            for node in nodes:
                node.kill(15)


@pytest.fixture
def cone(tmp_path: Path) -> Iterator[list[Node]]:
    yield from _mesh(tmp_path, "cone", "cone", [])


def test_cone_nats_link_directly_server_reflexive(cone: list[Node]) -> None:
    pub, home1, home2 = cone
    view = wait_until(lambda: _linked(home1, home2), 60, "home1 linked to home2")
    other = wait_until(lambda: _linked(home2, home1), 10, "home2 linked to home1")
    for path in (view["path"], other["path"]):
        assert path["type"] == "server-reflexive", path
        assert path["protocol"] == "udp"
        assert path["local"] == "srflx" and path["remote"] in ("srflx", "prflx"), path
    # the datagrams go NAT to NAT: each sees the other's router address, never its home address
    assert view["path"]["remote_address"].startswith(nat_netns.NatNetwork.uplink_address(2) + ":")
    assert other["path"]["remote_address"].startswith(nat_netns.NatNetwork.uplink_address(1) + ":")
    to_pub = home1.peers()[pub.peer_id]["path"]
    assert to_pub["remote"] == "host" and to_pub["local"] == "srflx" and to_pub["type"] == "server-reflexive"


TURN_UDP = f"turn:{nat_netns.SERVER}:{nat_netns.TURN_PORT}"
TURN_TCP = f"turn:{nat_netns.SERVER}:{nat_netns.TURN_PORT}?transport=tcp"


@pytest.fixture
def symmetric(tmp_path: Path) -> Iterator[list[Node]]:
    yield from _mesh(tmp_path, "cone", "symmetric", [TURN_UDP])


def test_symmetric_nat_links_through_turn_shown_as_relayed(symmetric: list[Node]) -> None:
    _, home1, home2 = symmetric

    def both_ends() -> list[dict] | None:
        # the two homes may dial each other at once (peer exchange and a learned address), and one link
        # then replaces the other: read both ends until they show one link (one of its ends is the relay)
        views = [_linked(home1, home2), _linked(home2, home1)]
        if not all(views):
            return None
        paths = [v["path"] for v in views]  # type: ignore[index]
        return paths if "relay" in (paths[0]["local"], paths[1]["local"]) else None

    paths = wait_until(both_ends, 60, "home1 and home2 linked")
    for path in paths:
        assert path["type"] == "relayed", path
        assert "relay" in (path["local"], path["remote"])
    # the relayed end's datagrams go to the TURN server over UDP; the relay's address is the server's
    relayed = [p for p in paths if p["local"] == "relay"]
    assert relayed and all(p["protocol"] == "udp" for p in relayed)
    assert all(p["local_address"].startswith(nat_netns.SERVER + ":") for p in relayed)
    check = wait_until(lambda: home2.get("/v1/mesh/peers")["ice"]["turn"][0]["ok"] is not None
                       and home2.get("/v1/mesh/peers")["ice"]["turn"][0], 20, "home2's TURN check")
    assert check["ok"] is True and check["relayed"].startswith(nat_netns.SERVER + ":"), check


@pytest.fixture
def udp_blocked(tmp_path: Path) -> Iterator[list[Node]]:
    # UDP TURN first: aiortc uses only the first TURN server, so the node must skip the one its check found
    # unreachable
    yield from _mesh(tmp_path, "cone", "udp-blocked", [TURN_UDP, TURN_TCP])


def test_udp_blocked_links_through_turn_over_tcp(udp_blocked: list[Node]) -> None:
    pub, home1, home2 = udp_blocked
    view = wait_until(lambda: _linked(home2, home1), 60, "home2 (no UDP out) linked to home1")
    path = view["path"]
    assert path["type"] == "relayed" and path["local"] == "relay" and path["protocol"] == "tcp", path
    to_pub = wait_until(lambda: _linked(home2, pub), 10, "home2 linked to the public member")
    assert to_pub["path"]["protocol"] == "tcp"
    checks = {c["url"]: c for c in home2.get("/v1/mesh/peers")["ice"]["turn"]}
    assert checks[TURN_UDP]["ok"] is False and checks[TURN_UDP]["code"] == "timeout", checks
    assert checks[TURN_TCP]["ok"] is True, checks


@pytest.fixture
def wrong_password(tmp_path: Path) -> Iterator[list[Node]]:
    yield from _mesh(tmp_path, "cone", "symmetric", [TURN_UDP], password="not-the-password")


def test_wrong_turn_credential_is_reported_not_a_crash(wrong_password: list[Node]) -> None:
    pub, home1, home2 = wrong_password

    def turn_status(node: Node) -> dict | None:
        checks = node.get("/v1/mesh/peers")["ice"]["turn"]
        return checks[0] if checks and checks[0]["ok"] is not None else None

    for node in (home1, home2):
        status = wait_until(lambda node=node: turn_status(node), 20, f"{node.name}'s TURN check")
        assert status["ok"] is False and status["code"] == "unauthorized", status
        assert "refused the configured credentials (401" in status["reason"], status
        assert status["credentials"] == "static"
    assert "relay unusable" in home2.log_tail() and "401" in home2.log_tail()
    # the members still link to the public one; no relayed pair between the homes, and nobody crashed
    wait_until(lambda: pub.peer_id in home2.peers(), 20, "home2 linked to the public member")
    assert not _linked(home2, home1) or _linked(home2, home1)["path"]["type"] != "relayed"
    # a failed attempt says how far ICE got: no relayed candidate on the side whose TURN refused it
    # (whichever home dials: the one with the smaller id)
    def timed_out() -> str | None:
        for node in (home1, home2):
            text = node.log_path.read_text(errors="replace") if node.log_path else ""
            found = [line for line in text.splitlines() if "timed out (ICE" in line]
            if found:
                return found[0]
        return None

    line = wait_until(timed_out, 40, "a timed-out dial with its ICE summary")
    local = line.split("local ", 1)[1].split(";", 1)[0]
    assert "srflx" in local and "relay" not in local, line
    for node in wrong_password:
        assert node.process is not None and node.process.poll() is None


@pytest.fixture
def mesh_credentials(tmp_path: Path) -> Iterator[list[Node]]:
    # the nodes are given no STUN/TURN server and no credential: the invite names the servers, and the
    # credentials come from the mesh secret
    invite = Invite.create("nat").with_servers((STUN, TURN_UDP))
    secret = turn_secret(invite.secret)  # what the relay's operator gives coturn (static-auth-secret)
    yield from _mesh(tmp_path, "cone", "symmetric", [TURN_UDP], secret, user=None, password=None,
                     invite=invite)


def test_invite_servers_and_turn_credentials_from_the_mesh_secret(mesh_credentials: list[Node]) -> None:
    _, home1, home2 = mesh_credentials
    view = wait_until(lambda: _linked(home2, home1), 60, "home2 linked to home1 through TURN")
    assert view["path"]["type"] == "relayed", view["path"]
    ice = home2.get("/v1/mesh/peers")["ice"]
    assert ice["stun"] == [STUN] and ice["turn"][0]["url"] == TURN_UDP, ice
    assert ice["turn"][0]["ok"] is True and ice["turn"][0]["credentials"] == "mesh", ice


@pytest.fixture
def open_cones(tmp_path: Path) -> Iterator[list[Node]]:
    yield from _mesh(tmp_path, "open-cone", "open-cone", [TURN_UDP])


def test_nats_without_a_wan_firewall_still_link_with_turn(open_cones: list[Node]) -> None:
    """Hole punching usually fails here (the NAT moves the hole when the peer's datagram came first); the
    link must still come up, through TURN where punching failed, and say which it is."""
    _, home1, home2 = open_cones
    view = wait_until(lambda: _linked(home1, home2), 60, "home1 linked to home2")
    assert view["path"]["type"] in ("server-reflexive", "peer-reflexive", "relayed"), view["path"]
    print(f"two NATs without WAN firewall linked as {view['path']['type']}")


def _relayed(home1: Node, home2: Node) -> list[dict]:
    """Both ends' paths once the homes share one link through TURN."""

    def both_ends() -> list[dict] | None:
        views = [_linked(home1, home2), _linked(home2, home1)]
        if not all(views):
            return None
        paths = [v["path"] for v in views]  # type: ignore[index]
        return paths if "relay" in (paths[0]["local"], paths[1]["local"]) else None

    return wait_until(both_ends, 60, "home1 and home2 linked through TURN")


def test_block_pull_over_the_relayed_link_gives_identical_bytes(symmetric: list[Node],
                                                                 tmp_path: Path) -> None:
    """A file published in home2 is pulled by home1 with only the mesh as source. home2's gateway address is
    in its own home (no route from home1), so the pull must fall back to the relayed data channel — and the
    gateway-preferring source is used, so a hanging gateway attempt would show here as a timeout."""
    _, home1, home2 = symmetric
    paths = _relayed(home1, home2)
    assert all(p["type"] == "relayed" for p in paths), paths
    content = os.urandom(600_000)  # several blocks: a DAG, not one leaf
    source = tmp_path / "published.bin"
    source.write_bytes(content)
    cid = home2.post("/test/publish", {"path": str(source)})["cid"]
    result = home1.post("/test/mesh-pull", {"cid": cid}, timeout=60)
    assert "error" not in result, result
    assert result["sha256"] == hashlib.sha256(content).hexdigest(), result
    assert result["stats"].get("channel", 0) >= 1 and not result["stats"].get("http"), result["stats"]
    # home2's gateway was tried once (the CAR stream's connect timed out), then left alone for the blocks too
    log = home1.log_path.read_text(errors="replace") if home1.log_path else ""
    assert log.count(f"gateway of {home2.peer_id[:12]} unreachable") == 1, home1.log_tail()
    # still the relayed link (the pull did not go round through the public member)
    assert _linked(home1, home2)["path"]["type"] == "relayed"
