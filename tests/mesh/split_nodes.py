"""Helpers for split/offload tests and the split bench: start real node processes
(`tests.mesh.split_harness`) in parallel, force routes, run completions (plain and streamed), change
policy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.mesh.mesh_nodes import free_port

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"


@dataclass
class SplitNode:
    name: str
    data_dir: Path
    args: list[str]
    prefix: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    """Address the API binds (a network namespace's address in the bench's --netns mode)."""
    key: str | None = None
    """API key: needed, and sent, when `host` is not loopback."""
    peer_id: str = ""
    process: subprocess.Popen[str] | None = None

    @property
    def api(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def launch(self, secret: str) -> None:
        log = open(self.log_path, "a")  # the process owns it
        command = [*self.prefix, sys.executable, "-m", "tests.mesh.split_harness",
                   "--data-dir", str(self.data_dir), "--api", self.api, "--name", self.name,
                   "--secret", secret, "-v", *self.args]
        if self.key:
            command += ["--api-key", self.key]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                                        env=env)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            if line.startswith("{"):
                self.peer_id = json.loads(line)["id"]
                return
        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = self._headers() if data is None else {**self._headers(), "Content-Type": "application/json"}
        request = urllib.request.Request(f"http://{self.api}{path}", data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def peers(self) -> dict[str, dict]:
        view = self.call("GET", "/v1/mesh/peers")
        return {p["id"]: p for p in view["peers"] if p["state"] == "connected"}

    def force(self, kind: str | None, *stages: tuple[str, str]) -> None:
        body = {} if kind is None else {"kind": kind, "stages": [{"peer": p, "layers": s} for p, s in stages]}
        reply = self.call("PUT", "/v1/mesh/route", body)
        assert "error" not in reply, reply

    def policy(self, **changes: Any) -> dict:
        reply = self.call("PUT", "/v1/policy", changes)
        assert "error" not in reply, reply
        return reply

    def chat(self, question: str, max_tokens: int) -> dict:
        body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "temperature": 0}
        return self.call("POST", "/v1/chat/completions", body)

    def chat_stream(self, question: str, max_tokens: int) -> Iterator[dict]:
        """Yield the SSE chunks (parsed) of a streamed greedy chat completion."""
        body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        request = urllib.request.Request(f"http://{self.api}/v1/chat/completions",
                                         data=json.dumps(body).encode(), method="POST",
                                         headers={**self._headers(), "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=180) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)


def start_nodes(nodes: list[SplitNode], secret: str) -> None:
    """Launch every node at once (model loading overlaps), then wait for each."""
    for node in nodes:
        node.launch(secret)
    try:
        for node in nodes:
            node.wait_ready()
    except BaseException:
        for node in nodes:
            node.kill()
        raise
