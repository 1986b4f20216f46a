"""The `shoal pull/publish/models` commands as real subprocesses: kill -9 mid-pull and resume; bad input (the
first case a process, the rest through the same command's `main` in the test process)."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest
from aiohttp import web
from shoal.mesh.ipfs.service import IpfsService
from shoal.mesh.ipfs.store import BlockStore

from tests.mesh.ipfs.conftest import offline_config
from tests.mesh.ipfs.faults import FaultyGateway
from tests.mesh.ipfs.jsipfs import REPO_ROOT, free_port
from tests.mesh.ipfs.test_pull import assert_store_all_verified

MIB = 1024 * 1024
SHOAL = [sys.executable, "-m", "shoal.mesh"]


async def shoal(*args: str, limit_s: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*SHOAL, *args, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    return proc.returncode or 0, out.decode(), err.decode()


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def block_files(data_dir: Path) -> int:
    blocks = data_dir / "ipfs" / "blocks"
    return sum(1 for shard in blocks.iterdir() for _ in shard.iterdir()) if blocks.exists() else 0


async def test_kill_9_midway_then_resume(write_data, tmp_path: Path) -> None:
    source = write_data(12 * MIB + 3, seed=9)  # 49 leaves + root
    async with IpfsService(offline_config(), tmp_path / "a") as node_a:
        cid = await node_a.publish(source)
    gateway = FaultyGateway(BlockStore(tmp_path / "a" / "ipfs"), "none", delay_s=0.08, car=False)
    runner = web.AppRunner(gateway.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    data_b = tmp_path / "b"
    pull_args = ["pull", str(cid), "--data-dir", str(data_b), "--no-rpc", "--gateway",
                 f"http://127.0.0.1:{port}", "--parallel", "2"]
    try:
        proc = await asyncio.create_subprocess_exec(*SHOAL, *pull_args, cwd=REPO_ROOT,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        for _ in range(1500):
            if block_files(data_b) >= 10:
                break
            assert proc.returncode is None, "the pull finished before it could be killed"
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        stored = block_files(data_b)
        assert 10 <= stored < 50
        assert not (data_b / "models" / f"{cid}.gguf").exists()
        requests_before = gateway.requests["raw"]

        code, out, err = await shoal(*pull_args)
    finally:
        await runner.cleanup()
    assert code == 0, err
    assert same_bytes(Path(out.strip()), source)
    fetched, local = map(int, re.search(r"fetched (\d+) blocks, (\d+) already local", err).groups())
    assert local == stored and fetched == 50 - stored
    assert gateway.requests["raw"] - requests_before == fetched  # nothing stored was asked for again
    service = IpfsService(offline_config(), data_b)
    assert assert_store_all_verified(service) == 50


def test_bad_input_gives_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each bad input is exit code 2 with its message and no traceback. The first runs as a process (the
    entry point); the others call `main` here (a process each was ~1 s apiece of the default suite)."""
    from shoal.mesh.commands.cli import main

    data = ["--data-dir", str(tmp_path / "n")]
    dead = f"http://127.0.0.1:{free_port()}"
    cases = [
        (["pull", "QmThisIsNotACid", *data, "--no-rpc"], "not a CID"),
        (["pull", "bafy-garbage", *data, "--no-rpc"], "not a CID"),
        (["pull", "no-such-model", *data, "--no-rpc"], "neither a known model name"),
        (["pull", "smollm2-135m-instruct", *data, "--rpc", dead, "--gateway", dead, "--retries", "1"],
         "cannot connect"),
        (["pull", "x", *data, "--gateway", "ftp://nope"], "http(s) URL"),
        (["publish", str(tmp_path / "missing.gguf"), *data], "is not a file"),
        (["publish", __file__, "--name", "Bad Name!", *data], "model name"),
    ]
    for i, (args, message) in enumerate(cases):
        if i == 0:
            code, _out, err = asyncio.run(shoal(*args))
        else:
            code = main(args)
            err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err


async def test_publish_then_models_lists_it(tmp_path: Path, write_data) -> None:
    source = write_data(300_000, seed=10)
    data = ["--data-dir", str(tmp_path / "n")]
    code, out, err = await shoal("publish", str(source), "--name", "tiny-test", *data)
    assert code == 0, err
    cid = out.strip()
    code, out, err = await shoal("models", *data)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("tiny-test"))
    assert cid in line and "pinned" in line and "293.0 KiB" in line
    assert "store: 3 blocks" in out  # two leaves and the root
    code, out, err = await shoal("models", "--unpin", "tiny-test", "--gc", *data)
    assert code == 0, err
    assert "gc: freed 3 blocks" in out and "store: 0 blocks" in out
    code, out, err = await shoal("models", "--unpin", "tiny-test", *data)
    assert code == 2 and "not pinned" in err
