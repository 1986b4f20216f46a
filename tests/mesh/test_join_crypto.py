"""crypto.js (the join page's SHA-256, SHA-512, HMAC and Ed25519 for pages outside a secure context) against
Python's hashlib, hmac and cryptography, run in Node.js where it is installed (skipped, visibly, elsewhere;
tests/mesh/test_browser_member.py runs it in Chromium too)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from shoal.mesh.api.join_page import STATIC

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
