"""Expiring invites (pure): token format, the key a joiner proves with, and what members refuse; the join
status and its refusal back-off."""

from __future__ import annotations

import base64
import hashlib
import time

import orjson
import pytest
from shoal.mesh.p2p.errors import InviteError, MembershipError
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.p2p.invite import PREFIX, Invite, invite_key
from shoal.mesh.p2p.join_status import JoinStatus, Refusal, refusal_backoff
from shoal.mesh.p2p.signalling import Membership, ReplayGuard, build_signal, verify_signal

SDP = "v=0\r\na=fingerprint:sha-256 AB:CD:EF\r\n"


def _fields(token: str) -> dict:
    payload = token[len(PREFIX) :]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    return orjson.loads(raw[:-4])


def _token(fields: dict) -> str:
    body = orjson.dumps(fields)
    raw = body + hashlib.sha256(body).digest()[:4]
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_expiring_invite_carries_a_key_not_the_secret_and_round_trips():
    full = Invite.create("home", ("127.0.0.1:8740",))
    assert set(_fields(full.to_token())) == {"n", "s", "b"}  # the old format, still what create() writes
    expires = int(time.time()) + 3600
    invite = full.expiring(expires)
    fields = _fields(invite.to_token())
    assert set(fields) == {"n", "k", "e", "m", "b"} and fields["e"] == expires
    assert base64.b64decode(fields["k"]) == invite_key(full.secret, expires) != full.secret
    parsed = Invite.from_token(invite.to_token())
    assert parsed == invite and parsed.mesh_id == full.mesh_id and not parsed.expired(time.time())
    assert parsed.expired(expires + 1)
    with pytest.raises(InviteError):
        parsed.expiring(expires + 10)  # no secret to derive another invite from
    with pytest.raises(InviteError):
        Invite.from_token(_token({**fields, "e": "tomorrow"}))
    with pytest.raises(InviteError):
        Invite.from_token(_token({**fields, "m": None}))


def _offer_and_verify(joiner: Membership, member: Membership, now: float | None = None) -> str:
    alice, bob = Identity.generate("joiner"), Identity.generate("member")
    offer = build_signal(alice, joiner, "offer", SDP, to=bob.peer_id)
    verified = verify_signal(offer, member, bob.peer_id, "offer", ReplayGuard(), now=now)
    answer = build_signal(bob, member, "answer", SDP, to=alice.peer_id, invite=verified.invite_expires)
    back = verify_signal(answer, joiner, alice.peer_id, "answer", ReplayGuard())
    assert back.admitted == "invite" and verified.invite_expires == joiner.invite_expires
    return verified.admitted


def test_members_admit_a_current_invite_and_refuse_an_expired_or_edited_one():
    full = Invite.create("home")
    member = Membership.from_invite(full)
    expires = int(time.time()) + 60
    invite = Invite.from_token(full.expiring(expires).to_token())
    assert _offer_and_verify(Membership.from_invite(invite), member) == "invite"

    with pytest.raises(MembershipError) as expired:
        _offer_and_verify(Membership.from_invite(invite), member, now=expires + 1)
    assert expired.value.code == "invite_expired" and "expired" in str(expired.value)

    # editing the expiry (a valid token again) leaves the key of the old expiry: not a member
    edited = Invite.from_token(_token({**_fields(invite.to_token()), "e": expires + 86400}))
    with pytest.raises(MembershipError) as forged:
        _offer_and_verify(Membership.from_invite(edited), member)
    assert forged.value.code == "not_member"

    # an invite to another mesh, or one naming another mesh id, is a foreign mesh
    other = Invite.create("other").expiring(expires)
    with pytest.raises(MembershipError) as foreign:
        _offer_and_verify(Membership.from_invite(other), member)
    assert foreign.value.code == "foreign_mesh"

    # a joiner not yet handed the secret cannot check a member's offer: a transient refusal
    me = Identity.generate("joiner")
    offer = build_signal(Identity.generate("member"), member, "offer", SDP, to=me.peer_id)
    with pytest.raises(MembershipError) as unkeyed:
        verify_signal(offer, Membership.from_invite(invite), me.peer_id, "offer")
    assert unkeyed.value.code == "invite_only"

    # after a rotation the old invite's key proves nothing
    rotated = Membership(secret=Invite.create("home").secret)
    old = Membership.from_invite(Invite(invite.name, invite.secret, (), invite.expires, rotated.mesh_id))
    with pytest.raises(MembershipError) as refused:
        _offer_and_verify(old, rotated)
    assert refused.value.code == "not_member"


def test_refusal_backoff_doubles_to_its_cap_and_status_reports_it():
    waits, wait = [], 0.0
    for _ in range(6):
        wait = refusal_backoff(wait, 10.0)
        waits.append(wait)
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]

    status = JoinStatus()
    assert status.view("m1", False, 0, False)["status"] == "none"
    assert status.view("m1", True, 0, True)["status"] == "joining"
    status.refused(Refusal("h:1", "invite_expired", "expired", time.time()), 4.0)
    view = status.view("m1", True, 0, True)
    assert view["status"] == "refused" and view["code"] == "invite_expired" and view["backoff_s"] == 4.0
    assert 0 < view["retry_in_s"] <= 4.0 and view["refusals"] == 1
    status.refused(Refusal("h:1", "glare", "glare", time.time()), 1.0)
    assert status.view("m1", True, 0, True)["status"] == "joining"  # a transient refusal
    status.linked()
    assert status.view("m1", True, 1, True) == {"status": "linked", "id": "m1", "links": 1, "refusals": 0}


def test_starting_invite_prefers_the_saved_secret_only_where_it_replaces_the_configured_one(tmp_path):
    from shoal.mesh.p2p.config import MeshConfig
    from shoal.mesh.p2p.invite import save_invite
    from shoal.mesh.p2p.rekey import add_superseded, starting_invite

    old, other = Invite.create("home"), Invite.create("other")
    expiring = old.expiring(int(time.time()) + 600)
    assert starting_invite(MeshConfig(), tmp_path) == (None, False)
    assert starting_invite(MeshConfig(invite=expiring.to_token()), tmp_path) == (expiring, False)
    save_invite(tmp_path, old)  # handed the secret over the link
    assert starting_invite(MeshConfig(invite=expiring.to_token()), tmp_path) == (old, True)
    assert starting_invite(MeshConfig(invite=other.to_token()), tmp_path) == (other, False)
    assert starting_invite(MeshConfig(), tmp_path) == (old, True)
    rotated = Invite.create("home")
    save_invite(tmp_path, rotated)
    add_superseded(tmp_path, old.mesh_id)
    assert starting_invite(MeshConfig(invite=old.to_token()), tmp_path) == (rotated, True)
    assert starting_invite(MeshConfig(secret=old.secret.hex()), tmp_path) == (rotated, True)
    assert starting_invite(MeshConfig(invite=other.to_token()), tmp_path) == (other, False)
