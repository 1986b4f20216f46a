"""Pure parts of the mesh layer: config validation, signal verification, advert filtering, ICE selection, a
link's bound on running handlers, which of two links to a peer both ends keep and when the other closes."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.errors import MembershipError, ProtocolError, SignallingError
from shoal.mesh.p2p.gossip import clean_advert
from shoal.mesh.p2p.ice import host_addresses
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.p2p.invite import Invite
from shoal.mesh.p2p.link_shared import HandlerSlots, LinkSettings
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.signalling import Membership, ReplayGuard, build_signal, sdp_fingerprints, verify_signal

SDP = "v=0\r\na=fingerprint:sha-256 AB:CD:EF\r\na=fingerprint:sha-512 01:02\r\n"


def test_mesh_config_validates_and_normalises():
    config = MeshConfig(bootstrap="10.0.0.1:8740, 10.0.0.2:8740", ice_interfaces=["lo"])
    assert config.bootstrap == ("10.0.0.1:8740", "10.0.0.2:8740")
    invite = Invite.create("x", ("10.0.0.3:1",))
    assert MeshConfig(invite=invite.to_token(), bootstrap=["10.0.0.1:8740"]).all_bootstrap() == (
        "10.0.0.1:8740",
        "10.0.0.3:1",
    )
    assert MeshConfig(secret=invite.secret.hex()).secret_bytes() == invite.secret
    for bad in (
        {"dead_timeout_s": 1.0, "heartbeat_interval_s": 1.0},
        {"allow": ["nope"]},
        {"invite": "shoal1-broken"},
        {"secret": "short"},
        {"bootstrap": ["no-port"]},
        {"abuse_limit": 0},
    ):
        with pytest.raises(ValueError):
            MeshConfig(**bad)


def test_sdp_fingerprints():
    assert sdp_fingerprints(SDP) == ["sha-256 AB:CD:EF", "sha-512 01:02"]


def test_verify_signal_accepts_members_and_refuses_the_rest():
    secret = b"k" * 32
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    members = Membership(secret=secret)
    offer = build_signal(alice, members, "offer", SDP, to=bob.peer_id, api="10.0.0.1:8740")
    verified = verify_signal(offer, members, bob.peer_id, "offer", ReplayGuard())
    assert verified.peer_id == alice.peer_id and verified.api == "10.0.0.1:8740"

    with pytest.raises(SignallingError, match="another node"):
        verify_signal(offer, members, Identity.generate().peer_id, "offer")
    with pytest.raises(SignallingError, match="expected an answer"):
        verify_signal(offer, members, bob.peer_id, "answer")
    with pytest.raises(SignallingError, match="stale"):
        verify_signal(offer, members, bob.peer_id, "offer", now=time.time() + 3600)
    with pytest.raises(MembershipError):
        verify_signal(offer, Membership(secret=b"z" * 32), bob.peer_id, "offer")
    outsider = build_signal(alice, Membership(secret=b"z" * 32), "offer", SDP)
    with pytest.raises(MembershipError):
        verify_signal(outsider, members, bob.peer_id, "offer")
    # the same outsider is admitted once it is on the allow-list
    allowing = Membership(secret=secret, allow=frozenset({alice.peer_id}))
    assert verify_signal(outsider, allowing, bob.peer_id, "offer").peer_id == alice.peer_id

    guard = ReplayGuard()
    verify_signal(offer, members, bob.peer_id, "offer", guard)
    with pytest.raises(SignallingError, match="replayed"):
        verify_signal(offer, members, bob.peer_id, "offer", guard)
    for broken in ({**offer, "extra": 1}, {**offer, "ts": "now"}, {**offer, "sig": "!!"}, [], "x"):
        with pytest.raises(SignallingError):
            verify_signal(broken, members, bob.peer_id, "offer")


def test_clean_advert_keeps_typed_fields_only():
    advert = clean_advert(
        {
            "models": ["smollm2", 3],
            "name": "x" * 500,
            "free_memory": 10,
            "queue_depth": True,
            "speed": {"m": {"decode_tok_s": 9}},
            "gateway": "yes",
            "evil": {"a": 1},
        }
    )
    assert advert["models"] == ["smollm2"]
    assert len(advert["name"]) == 200 and advert["free_memory"] == 10
    assert "queue_depth" not in advert and "evil" not in advert and advert["gateway"] is False
    with pytest.raises(p.ProtocolError):
        clean_advert({"models": "not a list"})


def test_host_addresses_can_include_loopback():
    assert "127.0.0.1" in host_addresses(["lo"], use_ipv6=False)
    assert host_addresses(["no-such-interface"]) == []


def test_mesh_section_of_the_node_config(tmp_path):
    from shoal.mesh.node.config import load_config

    invite = Invite.create("home", ("10.0.0.9:8740",))
    path = tmp_path / "config.toml"
    path.write_text(
        f'[mesh]\ninvite = "{invite.to_token()}"\nice_interfaces = ["lo"]\nmdns = false\ndead_timeout_s = 3\n'
    )
    config = load_config(path, environ={"SHOAL_MESH_BOOTSTRAP": "10.0.0.1:8740,10.0.0.2:8740"})
    mesh = config.mesh
    assert mesh.ice_interfaces == ("lo",) and mesh.mdns is False and mesh.dead_timeout_s == 3.0
    assert mesh.all_bootstrap() == ("10.0.0.1:8740", "10.0.0.2:8740", "10.0.0.9:8740")
    assert mesh.secret_bytes() == invite.secret


async def test_handler_slots_bound_running_and_admitted_handlers() -> None:
    slots = HandlerSlots(LinkSettings(max_running_handlers=1, max_pending_handlers=2))
    slots.admit()
    slots.admit()
    with pytest.raises(ProtocolError):
        slots.admit()  # a third waiting request is a violation
    release = asyncio.Event()
    running: list[str] = []

    async def handler(name: str) -> None:
        async with slots.run():
            running.append(name)
            await release.wait()

    first = asyncio.create_task(handler("first"))
    second = asyncio.create_task(handler("second"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert running == ["first"]  # one slot: the second waits
    second.cancel()  # a waiting handler that is cancelled gives its admission back
    await asyncio.gather(second, return_exceptions=True)
    assert slots.admitted == 1
    release.set()
    await first
    assert slots.admitted == 0
    slots.admit()


def test_crossed_dials_keep_the_smaller_nonce_and_a_later_offer_replaces():
    from shoal.mesh.p2p.link_shared import CONCURRENT_DIALS_S, LinkOffer, keeps_existing_link

    first, second = LinkOffer(1000.0, "0a"), LinkOffer(1002.5, "f3")
    assert keeps_existing_link(first, second) and not keeps_existing_link(second, first)  # both ends agree
    restarted = LinkOffer(1000.0 + CONCURRENT_DIALS_S + 0.1, "00")
    assert not keeps_existing_link(second, restarted) and not keeps_existing_link(first, restarted)
    # the later offer's link stays also where it opened first (an end may open it before the other one does)
    assert keeps_existing_link(restarted, first) and keeps_existing_link(restarted, second)
    # for any two offers, whichever order their links open in at either end, both ends keep the same one
    others = [LinkOffer(995.0, "ff"), LinkOffer(1011.0, "7c"), LinkOffer(1030.0, "01")]
    offers = [first, second, restarted, *others]
    for existing, new in itertools.permutations(offers, 2):
        assert keeps_existing_link(existing, new) != keeps_existing_link(new, existing), (existing, new)


async def test_a_link_lost_to_crossed_dials_closes_once_the_peer_started_the_kept_one(tmp_path) -> None:
    """Both ends keep the same link, but each opens it at its own moment: the link that lost stays open (not
    the node's link) until the peer's heartbeat arrives on the kept one, as until then it may be the only
    link open at the peer, where closing it would be a departure (`MeshService._retire`)."""
    from shoal.mesh.p2p.link_shared import LinkOffer
    from shoal.mesh.p2p.service import MeshService

    service = MeshService(MeshConfig(mdns=False, dead_timeout_s=30.0), Identity.generate("me"), tmp_path)
    service._running = True  # as started, without discovery's dialling or gossip's loop
    other = Identity.generate("other").peer_id

    def link(offer: LinkOffer) -> Peer:  # a link as the dialer hands it over, its channels never opened
        peer = service._new_peer(offerer=True)
        peer.identify(other, "other", None, "secret")
        peer.offer = offer
        return peer

    first, second, third = (link(LinkOffer(1000.0 + i, nonce)) for i, nonce in enumerate(("f3", "0a", "7c")))
    try:
        service._register(first)
        service._register(second)  # crossed, with the smaller nonce: it replaces `first`
        assert service.peers[other] is second
        await asyncio.sleep(0.05)
        assert first.state == "connected"  # the peer may not have opened `second` yet
        second.receive(p.CONTROL, p.encode_control(p.ControlFrame("ping", {"t": 1.0})))
        async with asyncio.timeout(5):
            await first.wait_closed()
        assert first.close_reason == "replaced by a new link"
        service._register(third)  # crossed, with a larger nonce: `second`, started by the peer, stays
        async with asyncio.timeout(5):
            await third.wait_closed()
        assert third.close_reason == "duplicate link (crossed dials)" and service.peers[other] is second
        assert service.departed == []
    finally:
        await service.stop()
