"""Network namespaces as separate "hosts" for mesh tests (root only): one namespace per host plus one with a
bridge, veth pairs between them, a private /24 with no default route; torn down in `close()`."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _tc(namespace: str, *qdisc: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`tc qdisc add dev eth0 root QDISC...` inside `namespace`."""
    return _ip("netns", "exec", namespace, "tc", "qdisc", "add", "dev", "eth0", "root", *qdisc, check=check)


def available() -> str | None:
    """None if namespaces can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    probe = f"shoalprobe{os.getpid()}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"ip netns add failed: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class HostNetwork:
    prefix: str
    hosts: int
    subnet: str = "10.213.77"
    names: list[str] = field(default_factory=list)
    netem: bool = False

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}br"

    def address(self, index: int) -> str:
        return f"{self.subnet}.{index + 1}"

    def exec_prefix(self, index: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[index]]

    def setup(self, rate: str | None = "50mbit", delay_ms: float = 0.0) -> HostNetwork:
        _ip("netns", "add", self.bridge_ns)
        self.names = []
        try:
            _ip("-n", self.bridge_ns, "link", "set", "lo", "up")
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge",
                "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for index in range(self.hosts):
                name = f"{self.prefix}h{index}"
                _ip("netns", "add", name)
                self.names.append(name)
                _ip("link", "add", "eth0", "netns", name, "type", "veth",
                    "peer", "name", f"veth{index}", "netns", self.bridge_ns)
                _ip("-n", self.bridge_ns, "link", "set", f"veth{index}", "master", "br0", "up")
                _ip("-n", name, "addr", "add", f"{self.address(index)}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
                if delay_ms:
                    netem = _tc(name, "netem", "delay", f"{delay_ms}ms", check=False)
                    self.netem = netem.returncode == 0
                if rate and not self.netem:
                    _tc(name, "tbf", "rate", rate, "burst", "32kb", "latency", "50ms")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for name in [*self.names, self.bridge_ns]:
            _ip("netns", "del", name, check=False)
        self.names = []
