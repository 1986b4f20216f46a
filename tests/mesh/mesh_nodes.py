"""Helpers for multi-node mesh tests: start real node processes (the mesh harness), talk to their HTTP API,
wait for conditions, and clean up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.nodes import free_port

__all__ = ["Node", "free_port", "full_mesh", "wait_until"]

REPO = Path(__file__).resolve().parents[2]
JSON = "application/json"
OCTET = "application/octet-stream"


@dataclass
class Node:
    name: str
    data_dir: Path
    api: str
    args: list[str]
    prefix: list[str] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None
    peer_id: str = ""
    log_path: Path | None = None
    http_prefix: list[str] = field(default_factory=list)
    """Command prefix (e.g. `ip netns exec H`) for reaching the API with curl from inside a namespace."""

    def start(self, timeout_s: float = 30.0) -> Node:
        self.log_path = self.data_dir.parent / f"{self.name}.log"
        log = open(self.log_path, "a")
        command = [
            *self.prefix,
            sys.executable,
            "-m",
            "tests.mesh.mesh_harness",
            "--data-dir",
            str(self.data_dir),
            "--api",
            self.api,
            "--name",
            self.name,
            "-v",
            *self.args,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + timeout_s
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            if line.startswith("{"):
                info = json.loads(line)
                self.peer_id, self.api = info["id"], info["api"]
                return self
        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path and self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def _curl(self, path: str, body: bytes | None, timeout: float, content_type: str = JSON) -> Any:
        command = [*self.http_prefix, "curl", "-s", "-m", str(timeout), f"http://{self.api}{path}"]
        if body is not None:
            command += ["--data-binary", "@-", "-H", f"Content-Type: {content_type}"]
        result = subprocess.run(command, input=body, capture_output=True, timeout=timeout + 5)
        if result.returncode != 0:
            raise OSError(f"curl {path} failed with {result.returncode}")
        return json.loads(result.stdout)

    def get(self, path: str, timeout: float = 10.0) -> Any:
        if self.http_prefix:
            return self._curl(path, None, timeout)
        with urllib.request.urlopen(f"http://{self.api}{path}", timeout=timeout) as response:
            return json.loads(response.read())

    def post_get(self, path: str, timeout: float = 30.0) -> Any:
        """GET that returns the JSON body of error responses too."""
        try:
            return self.get(path, timeout)
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def post(self, path: str, body: bytes | dict, timeout: float = 30.0) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        content_type = OCTET if isinstance(body, bytes) else JSON
        if self.http_prefix:
            return self._curl(path, data, timeout, content_type)
        request = urllib.request.Request(f"http://{self.api}{path}", data=data, method="POST",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def peers(self) -> dict[str, dict]:
        return {
            peer["id"]: peer for peer in self.get("/v1/mesh/peers")["peers"] if peer["state"] == "connected"
        }


def wait_until(condition: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except (OSError, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


def full_mesh(nodes: list[Node]) -> bool:
    for node in nodes:
        others = {other.peer_id for other in nodes if other is not node}
        if not others <= set(node.peers()):
            return False
    return True
