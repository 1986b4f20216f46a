"""ICE settings for aiortc: which local interfaces give host candidates, and which STUN/TURN servers to use.

aioice gathers host candidates from every interface except loopback, through the module-level function
`aioice.ice.get_host_addresses`. `restrict_host_addresses` replaces that function (process-wide) with one
that keeps only the allowed interfaces — named (`lo`, `eth0`) or by address (`127.0.0.1`) — so loopback works
for tests and a node can keep to its LAN. This is the one patch point into aioice's internals.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import aioice.ice
import aioice.turn
import ifaddr
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

logger = logging.getLogger(__name__)

_original_get_host_addresses: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses


def host_addresses(allowed: Sequence[str], use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
    """Addresses of the interfaces named (or addressed) in `allowed`, loopback included if listed."""
    wanted = set(allowed)
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        adapter_allowed = adapter.nice_name in wanted or adapter.name in wanted
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                if use_ipv4 and (adapter_allowed or ip.ip in wanted):
                    found.append(ip.ip)
            elif use_ipv6 and (adapter_allowed or ip.ip[0] in wanted) and ip.ip[2] == 0:
                found.append(ip.ip[0])
    return found


def restrict_host_addresses(allowed: Sequence[str]) -> None:
    """Make aioice gather host candidates only on `allowed` interfaces; an empty list restores its default."""
    if not allowed:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return
    names = tuple(allowed)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addresses = host_addresses(names, use_ipv4, use_ipv6)
        if not addresses:
            logger.warning("no local address on the allowed ICE interfaces %s", ", ".join(names))
        return addresses

    aioice.ice.get_host_addresses = get_host_addresses


def rtc_configuration(
    stun: Sequence[str] = (),
    turn: Sequence[str] = (),
    turn_username: str | None = None,
    turn_password: str | None = None,
) -> RTCConfiguration:
    """An aiortc configuration with exactly the configured servers (none by default: no public STUN)."""
    servers = [RTCIceServer(urls=url) for url in stun]
    servers += [RTCIceServer(urls=url, username=turn_username, credential=turn_password) for url in turn]
    return RTCConfiguration(iceServers=servers)


def delay_outgoing_datagrams(seconds: float) -> None:
    """Test hook: hold every datagram aioice sends for `seconds` (emulates link latency where the kernel has
    no `netem`). Order is kept since every datagram waits the same time. Process-wide; 0 turns it off."""
    protocol = aioice.ice.StunProtocol
    original = getattr(protocol, "_shoal_original_send_data", None) or protocol.send_data
    protocol._shoal_original_send_data = original  # type: ignore[attr-defined]
    if seconds <= 0:
        protocol.send_data = original  # type: ignore[method-assign]
        return

    async def send_data(self: aioice.ice.StunProtocol, data: bytes, addr: tuple[str, int]) -> None:
        import asyncio

        transport = self.transport
        asyncio.get_running_loop().call_later(seconds, transport.sendto, data, addr)

    protocol.send_data = send_data  # type: ignore[method-assign]


SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def enlarge_socket_buffers(size: int = SOCKET_BUFFER_BYTES) -> None:
    """Give aioice's UDP sockets a large kernel receive buffer (process-wide).

    aiortc's SCTP runs in Python: while the event loop is busy, datagrams pile up in the kernel, and aioice's
    256 KiB receive buffer (`aioice.turn.UDP_SOCKET_BUFFER_SIZE`, which it applies to every host socket)
    overflows under bulk transfer; SCTP then sees loss, times out and collapses its window (measured: 8 blocks
    in flight fell to 0.1 MiB/s). The kernel caps the size at `net.core.rmem_max`."""
    import aioice.turn

    aioice.turn.UDP_SOCKET_BUFFER_SIZE = size


CANDIDATE_WORDS = {"host": "host", "srflx": "server-reflexive", "prflx": "peer-reflexive", "relay": "relayed"}
"""ICE candidate types and the words `/v1/mesh/peers` uses for a link of that type."""


def _ice_connection(pc: RTCPeerConnection) -> Any:
    """aioice's `Connection` under a peer connection's data channels, or None before it exists."""
    try:
        return pc.sctp.transport.transport._connection if pc.sctp is not None else None
    except AttributeError:
        return None


LOCAL_NETWORKS_TTL_S = 10.0
"""How long the host's interface networks are reused by `_on_link` (listing them costs ~1 ms; the planner
asks for every peer on every request)."""
_local_networks: tuple[float, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] | None = None


def local_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of this host's interfaces, listed at most once per `LOCAL_NETWORKS_TTL_S`."""
    global _local_networks
    now = time.monotonic()
    if _local_networks is None or now - _local_networks[0] > LOCAL_NETWORKS_TTL_S:
        networks = []
        for adapter in ifaddr.get_adapters():
            for entry in adapter.ips:
                host = entry.ip if isinstance(entry.ip, str) else entry.ip[0]
                try:
                    networks.append(ipaddress.ip_network(f"{host}/{entry.network_prefix}", strict=False))
                except ValueError:
                    continue
        _local_networks = (now, networks)
    return _local_networks[1]


def _on_link(address: str) -> bool:
    """Whether `address` lies in the network of one of this host's interfaces (reached without a router)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip.version == network.version and ip in network for network in local_networks())


def _turn_transport(protocol: Any) -> str:
    """How a relayed candidate reaches its TURN server: `udp`, `tcp` or `tls` (aioice keeps the TURN client
    protocol in a private attribute of its `TurnTransport`)."""
    inner = getattr(getattr(protocol, "transport", None), "_TurnTransport__inner_protocol", None)
    if inner is None or not isinstance(inner, aioice.turn.TurnClientTcpProtocol):
        return "udp"
    stream = getattr(inner, "transport", None)
    return "tls" if stream is not None and stream.get_extra_info("sslcontext") is not None else "tcp"


def remote_addresses(pc: RTCPeerConnection) -> list[str]:
    """The peer's ICE candidates (`ip:port/udp`, at most 16) as it announced them in its SDP."""
    try:
        ice = pc.sctp.transport.transport if pc.sctp is not None else None
        candidates = ice.getRemoteCandidates() if ice is not None else []
    except AttributeError:
        return []
    return [f"{c.ip}:{c.port}/{c.protocol}" for c in candidates][:16]


def link_path(pc: RTCPeerConnection) -> dict[str, Any] | None:
    """The selected (nominated) ICE candidate pair of a link, or None before ICE has chosen one.

    `local`/`remote`: the ICE candidate types (`host`, `srflx`, `prflx`, `relay`). aioice pairs from the base
    of a server-reflexive candidate, so `local` says `srflx` where this host's socket has a STUN-learned
    mapping to another address and the remote end is not on a local network (the datagrams go through the
    NAT). `type`: the link as a whole in words — `relayed` if either end is relayed, else `server-reflexive`
    or `peer-reflexive` if either end is, else `host`. `protocol`: what this end sends over — `udp`, or for a
    relayed local candidate the transport to the TURN server (`udp`, `tcp`, `tls`)."""
    connection = _ice_connection(pc)
    pairs = getattr(connection, "_nominated", None)
    if not pairs:
        return None
    pair = pairs[min(pairs)]
    local, remote = pair.local_candidate, pair.remote_candidate
    local_type = local.type
    if local_type == "host" and not _on_link(remote.host):
        for candidate in connection.local_candidates:
            mapped = (candidate.related_address, candidate.related_port) == (local.host, local.port)
            if candidate.type == "srflx" and mapped and candidate.host != local.host:
                local_type = "srflx"
    ends = (local_type, remote.type)
    kind = next((t for t in ("relay", "srflx", "prflx") if t in ends), "host")
    return {
        "type": CANDIDATE_WORDS[kind],
        "local": local_type,
        "remote": remote.type,
        "protocol": _turn_transport(pair.protocol) if local.type == "relay" else "udp",
        "local_address": f"{local.host}:{local.port}",
        "remote_address": f"{remote.host}:{remote.port}",
    }


def ice_summary(pc: RTCPeerConnection) -> str:
    """Why a link may not have opened, in one line: the ICE state, the candidate types on each side and how
    the candidate-pair checks went (`ICE checking: local host,srflx; remote host,relay; 4 pairs: 3 failed,
    1 in progress`). A side with no `srflx` had no STUN answer; no `relay`, no TURN allocation."""
    connection = _ice_connection(pc)
    if connection is None:
        return "no ICE transport yet"
    local = ",".join(sorted({c.type for c in connection.local_candidates})) or "none"
    remote = ",".join(sorted({c.type for c in connection.remote_candidates})) or "none"
    states: dict[str, int] = {}
    for pair in getattr(connection, "_check_list", []):
        name = pair.state.name.lower().replace("_", " ")
        states[name] = states.get(name, 0) + 1
    checks = ", ".join(f"{count} {name}" for name, count in sorted(states.items())) or "none checked"
    return f"ICE {pc.iceConnectionState}: local {local}; remote {remote}; pairs: {checks}"
