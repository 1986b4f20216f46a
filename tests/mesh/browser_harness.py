"""What the browser-member tests and `bench/browser_member.py` share: a network namespace of their own for
Debian's Chromium and the nodes (`lo` and a veth pair inside it, a default route to a gateway that is not
there: no packet leaves it), nodes inside it reached with curl run there too, and polling with a deadline."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.mesh import chromium, netns
from tests.nodes import NodeProcess

TAB_ADDRESS = "198.51.100.7"
GATEWAY = "198.51.100.1"
"""The tabs' address, on a veth pair with both ends in the namespace, and a default route to a gateway that is
not there: Chromium gathers host candidates only on the default route's interface (none on `lo` alone), and
two tabs need one to link to each other (nodes offer loopback candidates, `[mesh] ice_interfaces = ["lo"]`).
Nothing leaves the namespace."""


def why_not() -> str | None:
    """Why browser tests cannot run here, or None."""
    if chromium.executable() is None:
        return "chromium is not installed (scripts/install.sh test installs it where apt is available)"
    return netns.available()


@contextmanager
def browser_namespace(prefix: str = "shoalweb") -> Iterator[str]:
    """A namespace with `lo` up and the tabs' veth pair; deleted on exit."""
    name = f"{prefix}{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    try:
        for command in (["link", "set", "lo", "up"], ["link", "add", "web0", "type", "veth", "peer", "web1"],
                        ["addr", "add", f"{TAB_ADDRESS}/24", "dev", "web0"], ["link", "set", "web0", "up"],
                        ["link", "set", "web1", "up"], ["route", "add", "default", "via", GATEWAY]):
            subprocess.run(["ip", "-n", name, *command], check=True, timeout=20)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=20)


class NamespacedNode(NodeProcess):
    """A `shoal node` inside the namespace; its API is reached with curl run there too."""

    def _curl(self, method: str, path: str, body: Any, timeout: float, *extra: str) -> bytes:
        command = [*self.prefix, "curl", "-s", "-m", str(timeout), "-X", method, *extra, self.url + path]
        for name, value in self.auth_headers().items():
            command += ["-H", f"{name}: {value}"]
        if body is not None:
            command += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        data = json.dumps(body).encode() if body is not None else None
        result = subprocess.run(command, input=data, capture_output=True, timeout=timeout + 10)
        if result.returncode != 0:
            raise OSError(f"curl {path}: exit {result.returncode}")
        return result.stdout

    def open_stream(self, path: str, body: Any) -> subprocess.Popen[bytes]:
        """POST `body` as a streamed request and leave it running (the caller ends it: a client that goes
        away)."""
        command = [*self.prefix, "curl", "-s", "-N", "-X", "POST", self.url + path,
                   "-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        for name, value in self.auth_headers().items():
            command += ["-H", f"{name}: {value}"]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        return json.loads(self._curl(method, path, body, timeout))

    def stream(self, path: str, body: Any, timeout: float = 180.0) -> list[dict[str, Any]]:
        """POST `body` and read the server-sent events: each `data:` payload as JSON (`[DONE]` left out)."""
        raw = self._curl("POST", path, body, timeout, "-N").decode()
        events = []
        for line in raw.splitlines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                events.append(json.loads(line[5:]))
        if not events:
            raise AssertionError(f"no events from {path}: {raw[:500]}")
        return events

    def members(self) -> dict[str, dict[str, Any]]:
        view = self.get("/v1/mesh/peers", timeout=10)
        return {p["id"]: p for p in view["peers"] if p["state"] == "connected"}


def wait(condition: Any, timeout_s: float, what: str) -> Any:
    """Poll `condition()` until it is truthy (a deadline, not a timing claim)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
