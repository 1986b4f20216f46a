"""Root CIDs from shoal's importer equal those of a real IPFS node (js-ipfs, offline on loopback) — and of
Debian's `ipfs_cid` for CIDv0 when it is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from shoal.mesh.ipfs.cid import parse_cid
from shoal.mesh.ipfs.importer import ImportOptions, import_file

from tests.mesh.ipfs.jsipfs import JsIpfs

KIB = 1024
MIB = 1024 * 1024
SIZES = [0, 1, 262143, 262144, 262145, 3 * MIB + 12345, 45 * MIB + 1]  # the last: 181 leaves > 174


async def jsipfs_add(rpc_url: str, path: Path, cid_version: int) -> str:
    params = {"only-hash": "true", "pin": "false", "cid-version": str(cid_version)}
    if cid_version == 1:
        params["raw-leaves"] = "true"
    async with aiohttp.ClientSession() as session:
        with path.open("rb") as body:
            form = aiohttp.FormData()
            form.add_field("file", body, filename=path.name)
            async with session.post(
                f"{rpc_url}/api/v0/add", params=params, data=form, timeout=aiohttp.ClientTimeout(total=120)
            ) as response:
                assert response.status == 200, await response.text()
                lines = [line for line in (await response.text()).splitlines() if line.strip()]
    import json

    return json.loads(lines[-1])["Hash"]


@pytest.mark.parametrize("cid_version", [0, 1])
@pytest.mark.parametrize("size", SIZES)
async def test_root_cid_matches_jsipfs(jsipfs: JsIpfs, write_data, size: int, cid_version: int) -> None:
    path = write_data(size)
    ours = import_file(path, options=ImportOptions(cid_version=cid_version)).root
    theirs = parse_cid(await jsipfs_add(jsipfs.rpc_url, path, cid_version))
    assert ours == theirs, f"size {size}, CIDv{cid_version}: shoal {ours} != js-ipfs {theirs}"
    assert ours.version == cid_version


def test_known_hello_world_cids(tmp_path: Path) -> None:
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello world\n")
    assert str(import_file(path, options=ImportOptions(cid_version=0)).root) == (
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    )
    assert str(import_file(path, options=ImportOptions(cid_version=1)).root) == (
        "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
    )


@pytest.mark.skipif(
    shutil.which("ipfs_cid") is None, reason="Debian's ipfs-cid (optional second oracle) absent"
)
@pytest.mark.parametrize("size", [0, 1, 262145, 3 * MIB + 12345])
def test_cidv0_matches_debian_ipfs_cid(write_data, size: int) -> None:
    path = write_data(size)
    out = subprocess.run(["ipfs_cid", str(path)], capture_output=True, text=True, timeout=60, check=True)
    assert str(import_file(path, options=ImportOptions(cid_version=0)).root) in out.stdout
