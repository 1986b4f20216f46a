"""The join page's modules run in Node.js (where it is installed; skipped, visibly, elsewhere) against Python:
crypto.js (SHA-256/512, HMAC, Ed25519 for pages outside a secure context) against hashlib, hmac and
cryptography; mesh.js's invites, signed signals (both ways) and TURN credentials against mesh/p2p, with
WebCrypto and without it. tests/mesh/test_browser_member.py runs them in Chromium."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from shoal.mesh.api.join_page import STATIC
from shoal.mesh.p2p.invite import Invite, join_url

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run crypto.js")

SCRIPT = """
import * as c from %s;
const cases = JSON.parse(process.argv[1]);
const bytes = (h) => Uint8Array.from(Buffer.from(h, "hex"));
const hex = (b) => Buffer.from(b).toString("hex");
const out = cases.map(({message, key, seed, foreign}) => ({
  sha256: hex(c.sha256(bytes(message))),
  sha512: hex(c.sha512(bytes(message))),
  hmac: hex(c.hmacSha256(bytes(key), bytes(message))),
  public: hex(c.ed25519PublicKey(bytes(seed))),
  signature: hex(c.ed25519Sign(bytes(seed), bytes(message))),
  verifies: c.ed25519Verify(bytes(foreign.public), bytes(foreign.signature), bytes(message)),
  tampered: c.ed25519Verify(bytes(foreign.public), bytes(foreign.signature), bytes(message + "00")),
}));
console.log(JSON.stringify(out));
"""


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_crypto_js_matches_python():
    cases, keys = [], []
    for size in (0, 1, 55, 56, 111, 112, 128, 3000):  # around SHA-256/512 padding boundaries
        seed, message, other = os.urandom(32), os.urandom(size), Ed25519PrivateKey.generate()
        keys.append(seed)
        cases.append({
            "message": message.hex(), "key": os.urandom(size % 90 + 1).hex(), "seed": seed.hex(),
            "foreign": {"public": _raw_public(other).hex(), "signature": other.sign(message).hex()},
        })
    module = json.dumps((STATIC / "crypto.js").as_uri())
    result = subprocess.run(["node", "--input-type=module", "-e", SCRIPT % module, json.dumps(cases)],
                            capture_output=True, text=True, timeout=120, check=True)
    for case, seed, got in zip(cases, keys, json.loads(result.stdout), strict=True):
        message = bytes.fromhex(case["message"])
        assert got["sha256"] == hashlib.sha256(message).hexdigest()
        assert got["sha512"] == hashlib.sha512(message).hexdigest()
        assert got["hmac"] == hmac.new(bytes.fromhex(case["key"]), message, hashlib.sha256).hexdigest()
        private = Ed25519PrivateKey.from_private_bytes(seed)
        assert got["public"] == _raw_public(private).hex()
        assert got["signature"] == private.sign(message).hex()  # Ed25519 signatures are deterministic
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(got["public"])).verify(
            bytes.fromhex(got["signature"]), message)
        assert got["verifies"] is True and got["tampered"] is False


INTEROP = """
import nodeCrypto from "node:crypto";
const input = JSON.parse(process.argv[1]);
if (input.plain) {  // as in a page outside a secure context: no crypto.subtle
  const shim = { getRandomValues: (a) => nodeCrypto.randomFillSync(a) };
  Object.defineProperty(globalThis, "crypto", { value: shim, configurable: true });
}
const m = await import(%s);
const plain = await import(%s);
const seed = Uint8Array.from(Buffer.from(input.seed, "hex"));
const identity = { id: m.peerIdFor(plain.ed25519PublicKey(seed)), name: "browser-test",
                   sign: async (b) => plain.ed25519Sign(seed, b) };
const out = { webcrypto: globalThis.crypto.subtle !== undefined, invites: [] };
for (const token of input.invites) {
  const membership = await m.parseInvite(token);
  const offer = await m.buildSignal(identity, membership, "offer", input.sdp);
  const answer = JSON.parse(input.answers[out.invites.length]);
  const check = (signal) => m.verifySignal(signal, membership, identity.id, "answer")
    .then((s) => s.from, (e) => e.code);
  const verified = await check(answer);
  const tampered = await check({ ...answer, name: "mallory" });
  out.invites.push({ mesh: membership.mesh, expires: membership.expires, servers: membership.servers,
    key: Buffer.from(membership.key).toString("hex"), offer, verified, tampered,
    turn: await m.turnCredentials(membership.key, membership.mesh, input.now),
    ice: await m.iceServers(membership, input.now) });
}
console.log(JSON.stringify(out));
"""
SDP = ("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
       "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
       "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n")


@pytest.mark.parametrize("webcrypto", [True, False], ids=["webcrypto", "crypto.js"])
def test_js_invites_signals_and_turn_credentials_match_python(webcrypto):
    from shoal.mesh.p2p.identity import Identity, peer_id_from_public_key
    from shoal.mesh.p2p.relays import rest_credentials, turn_secret
    from shoal.mesh.p2p.signalling import Membership, build_signal, verify_signal

    servers = ("stun:198.51.100.9:3478", "turn:198.51.100.9:3478?transport=udp")
    full = Invite.create("home", ("10.0.0.2:8740",)).with_servers(servers)
    expiring = full.expiring(int(time.time()) + 600).with_turn_credential("123:m-test", "pass+word")
    member, seed, now = Identity.generate("node-a"), os.urandom(32), 1_765_000_000
    js_id = peer_id_from_public_key(_raw_public(Ed25519PrivateKey.from_private_bytes(seed)))
    answers = [json.dumps(build_signal(member, Membership.from_invite(full), "answer", SDP, to=js_id,
                                       reply_to="n", invite=invite.expires))
               for invite in (full, expiring)]
    script = INTEROP % tuple(json.dumps((STATIC / name).as_uri()) for name in ("mesh.js", "crypto.js"))
    data = {"seed": seed.hex(), "sdp": SDP, "now": now, "answers": answers, "plain": not webcrypto,
            "invites": [full.to_token(), join_url("10.0.0.2:8740", expiring.to_token())]}
    result = subprocess.run(["node", "--input-type=module", "-e", script, json.dumps(data)],
                            capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(result.stdout)
    assert out["webcrypto"] is webcrypto
    for invite, got in zip((full, expiring), out["invites"], strict=True):
        assert (got["mesh"], got["expires"]) == (invite.mesh_id, invite.expires)
        assert tuple(got["servers"]) == servers
        assert bytes.fromhex(got["key"]) == invite.secret
        # the member checks the tab's offer exactly as a node's: signature, fingerprints, proof
        offer = verify_signal(got["offer"], Membership.from_invite(full), member.peer_id, "offer")
        assert offer.peer_id == js_id and offer.admitted == ("secret" if invite is full else "invite")
        assert got["verified"] == member.peer_id and got["tampered"] == "bad_signature"
    username, password = rest_credentials(turn_secret(full.secret), full.mesh_id, now=now)
    assert out["invites"][0]["turn"] == {"username": username, "credential": password}
    assert out["invites"][0]["ice"] == [{"urls": [servers[0]]},
                                        {"urls": [servers[1]], "username": username, "credential": password}]
    carried = {"username": "123:m-test", "credential": "pass+word"}  # what the expiring invite carries
    assert out["invites"][1]["ice"] == [{"urls": [servers[0]]}, {"urls": [servers[1]], **carried}]
