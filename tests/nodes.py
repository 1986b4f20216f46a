"""Start nodes the way users do: `python -m shoal.mesh node --config FILE`, every setting in the config file
(what a test needs beyond the defaults goes in `settings`, as TOML sections). One helper for tests and
benchmarks (`bench/` imports it too).

    node = NodeProcess("a", tmp_path / "a", {"models": {"backend": "numpy", "preload": False}}).start()
    node.get("/v1/node")
    node.stop()

The node is hermetic: loopback API on a free port, no mDNS, ICE on loopback, no IPFS daemon, no user config
or `SHOAL_*` environment (the suite's compile cache is kept). `start()` waits for `/health` by polling with
a deadline; `stop()` sends SIGTERM and waits (SIGKILL past the deadline)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody holds now, drawn from below the kernel's ephemeral range. A port
    from `bind(0)` is an ephemeral one: any process's next outgoing connection (another node's links) may
    take it before the node that was given it binds it — the port clash at a node's start, 1 run in ~30 of
    bench/split.py. Below that range only listeners that name their port compete."""
    low = _ephemeral_low()
    ports = range(max(1024, low - 12000), low)
    for _ in range(200):
        port = random.choice(ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free TCP port on 127.0.0.1 in {ports.start}-{ports.stop - 1}")


def node_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a node process: this one's, without `SHOAL_*` settings (the config file holds
    them) but with the suite's compile cache, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_") or k == "SHOAL_COMPILE_CACHE"}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML (use the string 'none' for an unset optional)")


def to_toml(config: Mapping[str, Any]) -> str:
    """Top-level keys, then one `[section]` per mapping (the shape `load_config` reads)."""
    lines = [f"{key} = {_toml_value(value)}"
             for key, value in config.items() if not isinstance(value, Mapping)]
    for section, values in config.items():
        if isinstance(values, Mapping):
            lines.append(f"\n[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra`'s sections merged in key by key."""
    out = {key: dict(value) if isinstance(value, Mapping) else value for key, value in base.items()}
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


@dataclass
class NodeProcess:
    """One `shoal node` process; `start()`/`stop()` may repeat (a restart keeps the data dir and port)."""

    name: str
    data_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    """Config beyond the hermetic defaults, in the file's shape: `{"models": {"preload": False}}`."""
    args: list[str] = field(default_factory=list)
    """Extra `shoal node` flags (e.g. `--join INVITE`)."""
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    prefix: list[str] = field(default_factory=list)
    """Command prefix: `taskset -c 1`, `ip netns exec H`."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the process (not settings: those go in the file)."""
    key: str | None = None
    """API key: written to `[api] key` and sent with every call."""
    process: subprocess.Popen[bytes] | None = None
    peer_id: str = ""

    @property
    def api(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.api}"

    @property
    def config_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.toml"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def config(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "name": self.name,
            "data_dir": str(self.data_dir),
            "api": {"host": self.host, "port": self.port, **({"key": self.key} if self.key else {})},
            "mesh": {"mdns": False, "ice_interfaces": ["lo"]},
            "ipfs": {"rpc_url": "none"},
        }
        return merged(base, self.settings)

    def command(self) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "shoal.mesh", "node", "--config", str(self.config_path),
                *self.args]

    def launch(self) -> NodeProcess:
        """Write the config file and start the process (returns at once; see `wait_ready`)."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config()))
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.command(), cwd=REPO, stdout=log, stderr=log,
                                            env=node_env(self.env))
        return self

    def wait_ready(self, timeout_s: float = 120.0, ready: Callable[[dict[str, Any]], bool] = lambda h: True
                   ) -> NodeProcess:
        """Poll `/health` until it answers and `ready(health)` holds; the peer id comes from `/v1/node`."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            try:
                if ready(self.get("/health", timeout=2.0)):
                    self.peer_id = self.get("/v1/node", timeout=5.0)["id"]
                    return self
            except (OSError, ValueError, KeyError):  # not listening yet, or not answering JSON yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become ready within {timeout_s:.0f} s: "
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def start(self, timeout_s: float = 120.0) -> NodeProcess:
        return self.launch().wait_ready(timeout_s)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Signal the process and wait for it (SIGKILL past `timeout_s`); returns its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def wait(self, timeout_s: float = 60.0) -> int:
        """Wait for the process to end by itself (after a signal already sent); returns its exit code."""
        assert self.process is not None, "not launched"
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, size: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-size:] if self.log_path.exists() else ""

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def call(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        """JSON in, JSON out; an HTTP error's JSON body is returned too (raises OSError when unreachable)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        headers.update(self.auth_headers())
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return self.call("GET", path, timeout=timeout)

    def post(self, path: str, body: Any, timeout: float = 60.0) -> Any:
        return self.call("POST", path, body, timeout=timeout)
