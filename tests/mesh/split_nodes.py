"""Helpers for split/offload tests and the split bench: real node processes (`tests.mesh.split_harness`, a
`tests.nodes.NodeProcess` with test-only instruments) started in parallel, forced routes, completions (plain
and streamed), policy changes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.nodes import REPO, NodeProcess, merged, node_env, to_toml

MODEL = "smollm2-135m-instruct"


SPLIT_TEST_CONFIG: dict[str, Any] = {
    "models": {"backend": "numpy", "max_batch": 4},
    "policy": {"serve_others": True, "trusted_only_splits": False, "prefer_local": False},
    "mesh": {"heartbeat_interval_s": 0.5, "dead_timeout_s": 2.0, "gossip_interval_s": 1.0,
             "retry_max_s": 2.0},
    "split": {"speed_probe": False},
}
"""What every split test node runs with (quick links and adverts, no trust or local preference in the way),
under `settings`: the NumPy backend, a node that serves others, no speed probe (~3 s of a core at each model
load, beside the test's own requests; the placement tests, which need measured speeds, start theirs with
it)."""


@dataclass
class SplitNode(NodeProcess):
    """A `tests.mesh.split_harness` process configured by a TOML file like any node (`NodeProcess`); the
    mesh secret is given at `launch`. `harness_args` are the harness's test-only instruments (`--no-model`,
    `--delay-ms`, `--trace`, `--switch-interval-ms`)."""

    harness_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: {"OPENBLAS_NUM_THREADS": "1"})

    def config(self) -> dict[str, Any]:
        return merged(super().config(), merged(SPLIT_TEST_CONFIG, self.settings))

    def command(self) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "tests.mesh.split_harness", "--config",
                str(self.config_path), "-v", *self.harness_args]

    def launch(self, secret: str | None = None) -> SplitNode:  # type: ignore[override]
        if secret is not None:
            self.settings = merged(self.settings, {"mesh": {"secret": secret}})
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config()))
        with open(self.log_path, "a") as log:  # the process keeps its own descriptor
            self.process = subprocess.Popen(self.command(), cwd=REPO, stdout=subprocess.PIPE, stderr=log,
                                            text=True, env=node_env(self.env))  # type: ignore[assignment]
        return self

    def wait_ready(self, timeout_s: float = 120.0, ready: Any = None) -> SplitNode:
        """Read the harness's ready line (it prints it once the model is loaded and advertised)."""
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            if line.startswith("{"):
                self.peer_id = json.loads(line)["id"]
                return self
        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:  # type: ignore[override]
        self.stop(sig, timeout_s=15.0)

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

    def chat(self, question: str, max_tokens: int, route: str | None = None) -> dict:
        """A greedy chat completion; `route`: the request's own (`{"shoal": {"route": ...}}`), else the
        planner's choice."""
        body: dict = {"model": MODEL, "messages": [{"role": "user", "content": question}],
                      "max_tokens": max_tokens, "temperature": 0}
        if route is not None:
            body["shoal"] = {"route": route}
        return self.call("POST", "/v1/chat/completions", body)

    def chat_stream(self, question: str, max_tokens: int, route: str | None = None) -> Iterator[dict]:
        """Yield the SSE chunks (parsed) of a streamed greedy chat completion; `route`: the request's own
        (`{"shoal": {"route": ...}}`), else the planner's choice."""
        body: dict = {"model": MODEL, "messages": [{"role": "user", "content": question}],
                      "max_tokens": max_tokens, "temperature": 0, "stream": True}
        if route is not None:
            body["shoal"] = {"route": route}
        request = urllib.request.Request(f"http://{self.api}/v1/chat/completions",
                                         data=json.dumps(body).encode(), method="POST",
                                         headers={**self.auth_headers(), "Content-Type": "application/json"})
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
