"""Start and stop js-ipfs (the IPFS oracle installed by scripts/install_ipfs_oracle.sh) offline on loopback,
with its own repo dir and free ports. Used by the tests and bench/pull.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.nodes import free_port

REPO_ROOT = Path(__file__).resolve().parents[3]
JSIPFS_DIR = REPO_ROOT / ".cache" / "jsipfs"
JSIPFS_BIN = JSIPFS_DIR / "node_modules" / ".bin" / "jsipfs"
INSTALL_HINT = "run scripts/install_ipfs_oracle.sh (scripts/install.sh test does) to install js-ipfs from npm"


class JsIpfsUnavailable(RuntimeError):
    pass


@dataclass
class JsIpfs:
    repo: Path
    rpc_url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["IPFS_PATH"] = str(repo)
    env["NODE_ENV"] = "test"
    env["NODE_OPTIONS"] = f"--require {JSIPFS_DIR / 'polyfill.cjs'}"
    return env


def start_jsipfs(repo: Path, ready_timeout_s: float = 60.0) -> JsIpfs:
    """Init a repo (test profile), point every listener at a free loopback port, start the daemon offline."""
    if not JSIPFS_BIN.exists():
        raise JsIpfsUnavailable(f"js-ipfs is not installed at {JSIPFS_BIN}: {INSTALL_HINT}")
    env = _env(repo)
    repo.mkdir(parents=True, exist_ok=True)
    init = subprocess.run(
        [str(JSIPFS_BIN), "init", "--profile", "test"], env=env, capture_output=True, text=True, timeout=120
    )
    if init.returncode != 0:
        raise JsIpfsUnavailable(f"jsipfs init failed: {init.stderr[-2000:]}")
    config_path = repo / "config"
    config = json.loads(config_path.read_text())
    api, gateway, rpc, swarm = (free_port() for _ in range(4))
    config["Addresses"].update(
        API=f"/ip4/127.0.0.1/tcp/{api}",
        Gateway=f"/ip4/127.0.0.1/tcp/{gateway}",
        RPC=f"/ip4/127.0.0.1/tcp/{rpc}",
        Swarm=[f"/ip4/127.0.0.1/tcp/{swarm}"],
        Delegates=[],
    )
    config["Bootstrap"] = []
    config.setdefault("Discovery", {}).update(MDNS={"Enabled": False}, webRTCStar={"Enabled": False})
    config_path.write_text(json.dumps(config, indent=1))
    log_path = repo / "daemon.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [str(JSIPFS_BIN), "daemon", "--offline", "--enable-preload=false"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    node = JsIpfs(repo=repo, rpc_url=f"http://127.0.0.1:{api}", process=process, log_path=log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise JsIpfsUnavailable(f"jsipfs daemon exited: {log_path.read_text()[-2000:]}")
        try:
            request = urllib.request.Request(f"{node.rpc_url}/api/v0/id", method="POST")
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return node
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    node.stop()
    raise JsIpfsUnavailable(f"jsipfs daemon not ready in {ready_timeout_s}s: {log_path.read_text()[-2000:]}")
