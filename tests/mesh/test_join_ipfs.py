"""The join page's verified fetch (mesh/api/static/join/ipfs.js) in Node.js (skipped, visibly, without it)
against shoal's own importer (mesh/ipfs/importer.py): DAGs of CIDv1 with raw leaves and of CIDv0 with dag-pb
leaves, one to three levels deep, and an empty file, each read back block by block from a gateway stand-in
(`fetch` answering from the importer's blocks) to the same bytes, hashing with WebCrypto and, as outside a
secure context, with crypto.js; a block that does not hash to its CID, one
over the size bound, a file over `maxBytes` and a missing block stop the fetch with a code. The browser test
(tests/mesh/test_browser_compute.py) fetches the real model from a real node's gateway."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
from typing import Any

import pytest
from shoal.mesh.api.join_page import STATIC
from shoal.mesh.ipfs.importer import ImportOptions, import_stream

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run ipfs.js")

SCRIPT = """
const { createHash } = await import("node:crypto");
const { root, blocks, corrupt, maxBytes, big, plain } = JSON.parse(process.argv[1]);
// `plain`: no WebCrypto, as in a page outside a secure context (http://LAN-ADDRESS/join): crypto.js hashes
if (plain) Object.defineProperty(globalThis, "crypto", { value: undefined, configurable: true });
const { fetchFile, parseCid } = await import(%s);
const served = [];
globalThis.fetch = async (url, options) => {
  const cid = url.match(/^\\/ipfs\\/([^?]+)\\?format=raw$/)[1];
  served.push(cid);
  if (!(cid in blocks)) {
    const error = { message: "not held", code: "block_not_found" };
    return new Response(JSON.stringify({ error }), { status: 404 });
  }
  let bytes = Buffer.from(blocks[cid], "base64");
  if (cid === corrupt) bytes[bytes.length - 1] ^= 1;
  if (cid === big) bytes = Buffer.concat([bytes, Buffer.alloc(3 * 1024 * 1024)]);
  return new Response(bytes, { status: 200, headers: { "Content-Type": "application/vnd.ipld.raw" } });
};
const progress = [];
try {
  const onProgress = (n, total) => progress.push([n, total]);
  const blob = await fetchFile(root, { maxBytes: maxBytes ?? 1 << 30, onProgress });
  const bytes = new Uint8Array(await blob.arrayBuffer());
  const digest = createHash("sha256").update(bytes).digest("hex");
  const version = parseCid(root).version;
  console.log(JSON.stringify({ size: bytes.length, digest, served, last: progress.at(-1), version }));
} catch (error) {
  console.log(JSON.stringify({ code: error.code, message: error.message, served }));
}
"""


def _dag(data: bytes, **options: Any) -> tuple[str, dict[str, str]]:
    blocks: dict[str, str] = {}
    result = import_stream(io.BytesIO(data), lambda b: blocks.__setitem__(str(b.cid),
                           base64.b64encode(b.data).decode()), ImportOptions(**options))
    return str(result.root), blocks


def _fetch(root: str, blocks: dict[str, str], **extra: Any) -> dict[str, Any]:
    module = json.dumps((STATIC / "ipfs.js").as_uri())
    result = subprocess.run(["node", "--input-type=module", "-e", SCRIPT % module,
                             json.dumps({"root": root, "blocks": blocks, **extra})],
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("options", [
    {"cid_version": 1, "chunk_size": 1000, "max_links": 174},  # one level: root + raw leaves
    {"cid_version": 1, "chunk_size": 1000, "max_links": 3},  # three levels
    {"cid_version": 0, "chunk_size": 1000, "max_links": 4},  # CIDv0, dag-pb leaves with inline data
    {"cid_version": 1, "chunk_size": 20_000, "max_links": 174},  # one block: the root is the raw leaf
])
@pytest.mark.parametrize("plain", [False, True], ids=["webcrypto", "crypto.js"])
def test_fetch_file_reads_back_what_the_importer_wrote(options, plain):
    data = os.urandom(17_345)
    root, blocks = _dag(data, **options)
    got = _fetch(root, blocks, plain=plain)
    assert got.get("digest") == hashlib.sha256(data).hexdigest() and got["size"] == len(data), got
    assert sorted(set(got["served"])) == sorted(blocks) and len(got["served"]) == len(blocks)  # each once
    assert got["last"] == [len(data), len(data)] and got["version"] == options["cid_version"]


def test_an_empty_file():
    root, blocks = _dag(b"")
    got = _fetch(root, blocks)
    assert got["size"] == 0 and got["digest"] == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("plain", [False, True], ids=["webcrypto", "crypto.js"])
def test_a_block_that_does_not_hash_to_its_cid_stops_the_fetch(plain):
    root, blocks = _dag(os.urandom(9_000), chunk_size=1000, max_links=3)
    for corrupt in (root, sorted(set(blocks) - {root})[0]):  # the root (dag-pb) and a leaf or inner node
        got = _fetch(root, blocks, corrupt=corrupt, plain=plain)
        assert got["code"] == "bad_block" and "does not match its CID" in got["message"], got


def test_bounds_and_missing_blocks_are_coded_errors():
    root, blocks = _dag(os.urandom(9_000), chunk_size=1000)
    leaf = sorted(set(blocks) - {root})[0]
    assert _fetch(root, blocks, big=leaf)["code"] == "too_large"  # a block over 2 MiB
    assert _fetch(root, blocks, maxBytes=8_000)["code"] == "too_large"  # the root's filesize over the bound
    missing = dict(blocks)
    del missing[leaf]
    got = _fetch(root, missing)
    assert got["code"] == "block_not_found" and leaf[:16] in got["message"]
    assert _fetch("QmNotACid", blocks)["code"] == "invalid_cid"
