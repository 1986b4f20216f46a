"""One node per data dir (a second `shoal node` on it exits with a clear message), and temp files a killed
writer left in the block store are removed when the store opens."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shoal.mesh.ipfs.store import BlockStore
from shoal.mesh.node.data_dir import DataDirInUseError, DataDirLock

from tests.mesh.api_harness import NodeThread, free_env, make_config

pytestmark = pytest.mark.timeout(300)


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path), DataDirLock(tmp_path)
    first.acquire()
    with pytest.raises(DataDirInUseError, match=rf"data dir {tmp_path} is in use by node pid {os.getpid()}"):
        second.acquire()
    assert not second.held
    first.release()
    first.release()  # twice is fine
    second.acquire()
    assert second.held
    second.release()


def test_lock_of_a_killed_node_does_not_block(tmp_path: Path) -> None:
    """The kernel drops a flock when its process dies, even on kill -9: the stale file blocks nothing."""
    code = ("import os, sys; from shoal.mesh.node.data_dir import DataDirLock; "
            "DataDirLock(sys.argv[1]).acquire(); os.kill(os.getpid(), 9)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, timeout=60)
    assert result.returncode == -9
    assert (tmp_path / "node.lock").read_text().strip().isdigit()  # its pid is still written there
    lock = DataDirLock(tmp_path)
    lock.acquire()
    lock.release()


async def test_second_node_on_one_data_dir_exits_with_the_message(tmp_path: Path) -> None:
    node = await asyncio.to_thread(
        NodeThread(make_config(tmp_path, models={"preload": False})).start, wait_ready=False)
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "shoal.mesh", "node", "--api", "127.0.0.1:0", "--data-dir", str(tmp_path)],
            env={**free_env(), "SHOAL_MODELS_PRELOAD": "false"}, capture_output=True, text=True, timeout=120,
        )
    finally:
        await asyncio.to_thread(node.stop)
    assert result.returncode == 2, result.stderr
    assert f"data dir {tmp_path} is in use by node pid {os.getpid()}" in result.stderr
    assert "Traceback" not in result.stderr


def test_stale_block_temp_of_a_dead_writer_is_removed_at_start(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "ipfs", fsync=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    tmp = tmp_path / "ipfs" / "tmp"
    stale = tmp / f"blk-{dead_pid}-0badc0de-3"  # a fresh file: only its writer's death makes it stale
    stale.write_bytes(b"half a block")
    earlier_self = tmp / f"blk-{os.getpid()}-00000000-1"  # an earlier process that had this pid
    earlier_self.write_bytes(b"x")
    live = tmp / f"blk-{os.getppid()}-12345678-0"  # the parent is alive: maybe still writing
    live.write_bytes(b"y")
    other = tmp / "pins-abc"  # not a block temp: left to the age rule
    other.write_bytes(b"{}")
    del store
    BlockStore(tmp_path / "ipfs", fsync=False)
    assert not stale.exists() and not earlier_self.exists()
    assert live.exists() and other.exists()
