"""Two "home" networks behind NATs, a "public" network with a STUN/TURN server and a reachable member, all in
network namespaces this helper makes (root only; see ../shared/FACTS.md "NATs, relays and slow devices").

    home1 198.51.100.2/26  - router1 198.51.100.1 | 203.0.113.11 (NAT) -+
                                                                        +- public bridge 203.0.113.1 (coturn)
    home2 198.51.100.66/26 - router2 198.51.100.65 | 203.0.113.12 (NAT) -+   public host 203.0.113.2

Each router masquerades its home behind its uplink address and drops unsolicited datagrams to itself (a home
router's WAN firewall): a cone NAT (Linux keeps the source port and lets replies in), a symmetric one
(`--random-fully`: a new random port per destination), one that also drops all UDP (then only TCP leaves
home), or `open-cone`: a cone NAT without that firewall, where early inbound datagrams become conntrack
entries that move the hole to another port (docs/mesh.md, "Two traps"). The homes have no route to each
other's addresses. Only documentation ranges (198.51.100.0/24, 203.0.113.0/24) are used, and only inside
these namespaces.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.mesh import netns

SERVER = "203.0.113.1"
PUBLIC_HOST = "203.0.113.2"
TURN_PORT = 3478
NOWHERE = "203.0.113.254"
NAT_KINDS = ("cone", "symmetric", "udp-blocked", "open-cone")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def available() -> str | None:
    """None if the NAT topology can be built here (and coturn runs in it), else why not."""
    why = netns.available()
    if why:
        return why
    for tool, package in (("iptables", "iptables"), ("turnserver", "coturn")):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package {package}; `scripts/install.sh test` installs it)"
    return None


@dataclass
class NatNetwork:
    """The topology; `setup(nat1, nat2)` with each NAT one of `NAT_KINDS`, `close()` removes everything."""

    prefix: str
    names: list[str] = field(default_factory=list)
    turn_process: subprocess.Popen[bytes] | None = None

    @property
    def public(self) -> str:
        return f"{self.prefix}pub"

    @property
    def public_host(self) -> str:
        return f"{self.prefix}ph"

    def home(self, index: int) -> str:
        return f"{self.prefix}h{index}"

    def router(self, index: int) -> str:
        return f"{self.prefix}r{index}"

    @staticmethod
    def home_address(index: int) -> str:
        return f"198.51.100.{2 + 64 * (index - 1)}"

    @staticmethod
    def uplink_address(index: int) -> str:
        return f"203.0.113.{10 + index}"

    def exec_prefix(self, namespace: str) -> list[str]:
        return ["ip", "netns", "exec", namespace]

    def _add(self, name: str) -> None:
        _ip("netns", "add", name)
        self.names.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _iptables(self, namespace: str, *rule: str) -> None:
        subprocess.run([*self.exec_prefix(namespace), "iptables", *rule], check=True, capture_output=True,
                       text=True, timeout=20)

    def setup(self, nat1: str = "cone", nat2: str = "cone") -> NatNetwork:
        for kind in (nat1, nat2):
            if kind not in NAT_KINDS:
                raise ValueError(f"NAT kind {kind!r} is not one of {NAT_KINDS}")
        try:
            self._add(self.public)
            pub = self.public
            _ip("-n", pub, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
            _ip("-n", pub, "addr", "add", f"{SERVER}/24", "dev", "br0")
            _ip("-n", pub, "link", "set", "br0", "up")
            # the rest of the internet: datagrams to addresses nobody here has vanish silently, as they do
            # out there (with no route at all, coturn's sends fail and it drops the allocation)
            # (a gateway that never answers ARP)
            _ip("-n", pub, "route", "add", "default", "via", NOWHERE)
            self._add(self.public_host)
            self._uplink(self.public_host, "vph", f"{PUBLIC_HOST}/24")
            for index, kind in ((1, nat1), (2, nat2)):
                self._home(index, kind)
        except BaseException:
            self.close()
            raise
        return self

    def _uplink(self, namespace: str, bridge_end: str, address: str) -> None:
        _ip("link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name", bridge_end,
            "netns", self.public)
        _ip("-n", self.public, "link", "set", bridge_end, "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", address, "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")

    def add_public_host(self, index: int) -> str:
        """Another member's namespace on the public bridge, at 203.0.113.(2 + index) (index 1: .3); a link
        between two public hosts is a plain host link over the same bridge, the baseline of bench rows."""
        if not 1 <= index <= 7:
            raise ValueError("public host index must be 1..7 (203.0.113.3-9)")
        namespace = f"{self.prefix}ph{index}"
        self._add(namespace)
        self._uplink(namespace, f"vph{index}", f"203.0.113.{2 + index}/24")
        return namespace

    def _home(self, index: int, kind: str) -> None:
        router, home = self.router(index), self.home(index)
        self._add(router)
        self._add(home)
        self._uplink(router, f"vr{index}", f"{self.uplink_address(index)}/24")
        gateway = f"198.51.100.{1 + 64 * (index - 1)}"
        _ip("link", "add", "eth0", "netns", home, "type", "veth", "peer", "name", "lan", "netns", router)
        _ip("-n", router, "addr", "add", f"{gateway}/26", "dev", "lan")
        _ip("-n", router, "link", "set", "lan", "up")
        _ip("-n", home, "addr", "add", f"{self.home_address(index)}/26", "dev", "eth0")
        _ip("-n", home, "link", "set", "eth0", "up")
        _ip("-n", home, "route", "add", "default", "via", gateway)
        _ip("-n", router, "route", "add", "default", "via", SERVER)
        subprocess.run([*self.exec_prefix(router), "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
                       check=True, capture_output=True, timeout=20)
        # a home router's WAN firewall: nothing unsolicited reaches the router itself. Without it, a datagram
        # that arrives before the home member's own first one leaves becomes a conntrack entry for the router,
        # and the NAT then maps the member's datagrams to a new port: hole punching fails.
        if kind != "open-cone":  # a Linux box that only masquerades: its own ports are open to the internet
            self._iptables(router, "-A", "INPUT", "-i", "eth0", "-m", "conntrack", "--ctstate", "NEW,INVALID",
                           "-j", "DROP")
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"]
        self._iptables(router, *masquerade, *(["--random-fully"] if kind == "symmetric" else []))
        if kind == "udp-blocked":
            self._iptables(router, "-A", "FORWARD", "-o", "eth0", "-p", "udp", "-j", "DROP")

    def start_turn(self, log_dir: Path, user: str = "shoal", password: str = "shoal-pass",
                   realm: str = "shoal.test", secret: str | None = None) -> None:
        """coturn in the public namespace on `SERVER:3478` (STUN and TURN, UDP and TCP): with a static user,
        or with `secret` for TURN REST-style credentials (`--use-auth-secret`)."""
        auth = ["--use-auth-secret", f"--static-auth-secret={secret}"] if secret else [
            "--lt-cred-mech", f"--user={user}:{password}"]
        log = open(log_dir / "turnserver.log", "wb")
        self.turn_process = subprocess.Popen(
            [*self.exec_prefix(self.public), "turnserver", "-n", f"--listening-ip={SERVER}",
             f"--relay-ip={SERVER}", f"--listening-port={TURN_PORT}", *auth, f"--realm={realm}",
             "--no-tls", "--no-dtls", "--no-cli", "--log-file=stdout", "--simple-log",
             f"--pidfile={log_dir / 'turnserver.pid'}", f"--userdb={log_dir / 'turndb'}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listening = subprocess.run([*self.exec_prefix(self.public), "ss", "-lntu"], capture_output=True,
                                       text=True, timeout=10).stdout
            if f"{SERVER}:{TURN_PORT}" in listening:
                return
            if self.turn_process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"turnserver did not start; see {log_dir / 'turnserver.log'}")

    def close(self) -> None:
        if self.turn_process is not None and self.turn_process.poll() is None:
            self.turn_process.terminate()
            try:
                self.turn_process.wait(5)
            except subprocess.TimeoutExpired:
                self.turn_process.kill()
                self.turn_process.wait(5)
        self.turn_process = None
        for name in reversed(self.names):
            _ip("netns", "del", name, check=False)
        self.names = []
