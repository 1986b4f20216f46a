"""The one place where shoal reaches into aiortc's internals to make data channels faster.

aiortc runs SCTP in Python: every SCTP packet costs a DTLS record, an SCTP parse, a selective
acknowledgement (SACK) and a UDP datagram on both ends, and it sends DATA chunks of at most 1,172 bytes (so
that a packet fits the smallest IPv6 path MTU), about 900 packets per MiB. Profiling a node that pulls blocks
from three peers at once showed its single thread spending ~37 % of its time sending one SACK per received
packet (mostly the `sendto` system call) and most of the rest in per-packet work. Two changes, both measured
with `bench/mesh_link.py`:

1. **Delayed SACK** (`apply()`, process-wide, safe with any peer): a SACK goes out for every second packet
   carrying DATA, at once when the packet revealed a gap or a duplicate, and otherwise as soon as the event
   loop runs out of received datagrams — RFC 9260 §6.2 ("at least every second packet", within 200 ms).
   aiortc's sender sends at most four packets past its flight size per SACK, so one SACK per two packets
   keeps its window growing. Except: a lone packet after a quiet link (a split stage call, one packet each
   way) is acknowledged `LONE_SACK_DELAY_S` later, since a SACK sent right after it arrived kept the event
   loop (and the GIL) busy while the thread the message was for (the stage worker, the origin's engine
   thread) waited to run. Bulk transfers, whose packets arrive back to back, keep the end-of-burst SACK.

2. **Large packets** (per link, opt-in by both ends): when the remote shoal node says (in the `link` control
   frame, see `mesh.peer`) that it can take them and the selected ICE pair allows them (loopback, or a host
   pair on an interface whose MTU both ends report as large), `enable_large_send` makes this end's SCTP
   cut messages into chunks that fill one DTLS record (up to 16 KiB of plaintext, RFC 9147). Before
   announcing the capability an end calls `enable_large_receive`, which lets its DTLS transport read whole
   records instead of the first 1,500 bytes. Links to standard WebRTC peers never see either.

Both touch private names of aiortc 1.16 (`RTCSctpTransport._send_sack`, `_send`, `_transmit`,
`_receive_sack_chunk`, `_t3_expired`, the module constant `USERDATA_MAX_LENGTH`, and
`RTCDtlsTransport._ssl`), so `apply()` checks the installed version against `SUPPORTED_VERSIONS` and leaves
aiortc alone (links then run at stock speed, with a warning) when it does not match. Tests:
`tests/mesh/test_aiortc_tuning.py` (real aiortc links between real processes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
import types
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiortc
from aiortc import RTCPeerConnection, rtcsctptransport
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcsctptransport import RTCSctpTransport

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("1.16.",)
"""aiortc releases whose internals this module was written against (prefix match)."""
SACK_EVERY = 2
"""Packets with DATA acknowledged by one SACK while more datagrams are waiting (RFC 9260 §6.2)."""
DTLS_MAX_PLAINTEXT = 16_384
"""The largest plaintext of one DTLS record (RFC 9147 §4), hence the largest SCTP packet we send."""
RECORD_READ_SIZE = DTLS_MAX_PLAINTEXT + 2_048
"""Bytes read from OpenSSL per record or datagram once large packets are on (record plus header, IV, tag)."""
SCTP_OVERHEAD = rtcsctptransport.SCTP_COMMON_HEADER_LENGTH + rtcsctptransport.SCTP_DATA_CHUNK_HEADER_LENGTH
PATH_OVERHEAD = 40 + 8 + 64
"""IPv6 header + UDP header + a generous allowance for the DTLS record header, explicit IV and tag."""
STANDARD_CHUNK = rtcsctptransport.USERDATA_MAX_LENGTH
LONE_SACK_DELAY_S = 0.003
"""How long the SACK of an unpaired DATA packet waits (RFC 9260 allows 200 ms). Measured with
`bench/split.py --trace`, 2-stage loopback decode, interleaved A/B, 6 pairs: sent once the loop was idle,
the peer's loop → stage-worker hop took 311-464 µs and the origin's loop → engine-thread hop 273-432 µs;
3 ms later, 182-269 µs and 181-248 µs (docs/split.md, "Thread hand-offs and the lone SACK")."""
QUIET_LINK_S = 0.002
"""A DATA packet arriving this long after the previous one on its association starts an exchange (not a
burst): if no second packet follows, its SACK waits `LONE_SACK_DELAY_S`. Back-to-back packets are far closer
(block pulls: well under 1 ms), so bulk transfers keep acknowledging at the end of each burst (deferring
those too gave 33-39 instead of 44-51 MiB/s for the 3-peer block pull in `bench/mesh_link.py`)."""
MIN_USEFUL_PACKET = 4_096
"""Below this a larger packet is not worth leaving the standard size for."""

_state: dict[str, Any] = {"applied": None}
_large_classes: dict[int, type[RTCSctpTransport]] = {}


def version_supported(version: str | None = None) -> bool:
    version = aiortc.__version__ if version is None else version
    return version.startswith(SUPPORTED_VERSIONS)


def apply() -> bool:
    """Install the delayed SACK (idempotent). Returns whether aiortc is tuned (False: unknown version)."""
    if _state["applied"] is not None:
        return bool(_state["applied"])
    if not version_supported():
        logger.warning(
            "aiortc %s is not one of %s: data channels run untuned (slower)",
            aiortc.__version__,
            ", ".join(SUPPORTED_VERSIONS),
        )
        _state["applied"] = False
        return False
    original = RTCSctpTransport._send_sack
    _state["original_send_sack"] = original
    RTCSctpTransport._send_sack = _delayed_send_sack(original)  # type: ignore[method-assign]
    _state["applied"] = True
    return True


def applied() -> bool:
    return bool(_state["applied"])


def _delayed_send_sack(
    original: Callable[[RTCSctpTransport], Coroutine[Any, Any, None]],
) -> Callable[[RTCSctpTransport], Coroutine[Any, Any, None]]:
    """Wrap aiortc's `_send_sack`, which its `_handle_data` calls after every packet that carried DATA."""

    async def flush(sctp: Any) -> None:
        sctp._shoal_sack_task = None
        if sctp._sack_needed:
            sctp._shoal_unacked = 0
            try:
                await original(sctp)
            except ConnectionError:
                pass  # the association is closing; nothing left to acknowledge

    def schedule(sctp: Any) -> None:
        sctp._shoal_sack_handle = None
        if sctp._sack_needed and getattr(sctp, "_shoal_sack_task", None) is None:
            sctp._shoal_sack_task = asyncio.ensure_future(flush(sctp))

    async def send_sack(sctp: Any) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        quiet = now - getattr(sctp, "_shoal_last_data", float("-inf")) > QUIET_LINK_S
        sctp._shoal_last_data = now
        unacked = getattr(sctp, "_shoal_unacked", 0) + 1
        if unacked >= SACK_EVERY or sctp._sack_misordered or sctp._sack_duplicates:
            sctp._shoal_unacked = 0
            handle = getattr(sctp, "_shoal_sack_handle", None)
            if handle is not None:  # this SACK covers it; later lone packets get their own
                handle.cancel()
                sctp._shoal_sack_handle = None
            await original(sctp)
            return
        sctp._shoal_unacked = unacked
        if getattr(sctp, "_shoal_sack_handle", None) is None:
            if quiet:  # off the critical path of a request/response exchange (see LONE_SACK_DELAY_S)
                sctp._shoal_sack_handle = loop.call_later(LONE_SACK_DELAY_S, schedule, sctp)
            else:  # runs once the loop has handled the datagrams already queued: the end of a burst
                sctp._shoal_sack_handle = loop.call_soon(schedule, sctp)

    send_sack.__doc__ = "SACK every second DATA packet, on loss at once, else when the burst ends."
    return send_sack


# ----- large packets --------------------------------------------------------------------------------------


class _RecordSizedConnection:
    """Stands in for a pyOpenSSL `Connection` inside one `RTCDtlsTransport`: aiortc reads at most 1,500
    bytes per `recv` and per `bio_read`, which would cut a larger DTLS record in two. Everything else is
    passed through."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self.read_size = 1_500
        self.bio_write = connection.bio_write
        self.send = connection.send

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        return self._connection.recv(max(bufsiz, RECORD_READ_SIZE), flags)

    def bio_read(self, bufsiz: int) -> bytes:
        return self._connection.bio_read(max(bufsiz, self.read_size))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def _dtls(pc: RTCPeerConnection) -> RTCDtlsTransport | None:
    sctp = pc.sctp
    return None if sctp is None else sctp.transport


def enable_large_receive(pc: RTCPeerConnection) -> int:
    """Let this link's DTLS transport take whole records of any size; returns the largest SCTP packet it can
    now receive (0 when aiortc is untuned or the link is not up)."""
    dtls = _dtls(pc)
    connection = getattr(dtls, "_ssl", None)
    if not applied() or dtls is None or connection is None:
        return 0
    if not isinstance(connection, _RecordSizedConnection):
        dtls._ssl = _RecordSizedConnection(connection)
    return DTLS_MAX_PLAINTEXT


def interface_mtu(address: str) -> int | None:
    """MTU of the local interface that holds `address` (Linux `/sys/class/net`; None where unknown)."""
    if sys.platform != "linux":
        return None
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            held = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if held == address:
                try:
                    return int(Path(f"/sys/class/net/{adapter.name}/mtu").read_text())
                except (OSError, ValueError):
                    return None
    return None


def selected_pair(pc: RTCPeerConnection) -> tuple[str, str, str] | None:
    """(local address, remote address, local candidate type) of the link's nominated ICE pair."""
    dtls = _dtls(pc)
    try:
        pair = dtls.transport._connection._nominated.get(1) if dtls is not None else None
    except AttributeError:
        return None
    if pair is None:
        return None
    return pair.local_candidate.host, pair.remote_addr[0], pair.local_candidate.type


def local_path_mtu(pc: RTCPeerConnection) -> int:
    """What this end knows of the path MTU of the link: its interface MTU for a host pair (65,536 for
    loopback), 0 for anything relayed, reflexive or unknown."""
    pair = selected_pair(pc)
    if pair is None:
        return 0
    local, remote, kind = pair
    try:
        loopback = ipaddress.ip_address(local).is_loopback and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return 0
    if loopback:
        return 65_536
    if kind != "host":
        return 0
    return interface_mtu(local) or 0


def large_packet_size(remote_max_packet: int, local_mtu: int, remote_mtu: int) -> int:
    """The SCTP packet size to send on a link, from what the remote can receive and both ends' MTUs;
    0 means keep aiortc's standard size."""
    path = min(local_mtu, remote_mtu) - PATH_OVERHEAD
    size = min(remote_max_packet, DTLS_MAX_PLAINTEXT, path)
    return size if size >= MIN_USEFUL_PACKET else 0


def _large_class(chunk: int) -> type[RTCSctpTransport]:
    """A subclass of `RTCSctpTransport` whose fragmenting and congestion-window code sees
    `USERDATA_MAX_LENGTH = chunk`: the same functions, re-created over a copy of the module's globals."""
    cls = _large_classes.get(chunk)
    if cls is not None:
        return cls
    namespace = dict(vars(rtcsctptransport))
    namespace["USERDATA_MAX_LENGTH"] = chunk
    methods: dict[str, Any] = {}
    for name in ("_send", "_transmit", "_receive_sack_chunk", "_t3_expired"):
        func = getattr(RTCSctpTransport, name)
        clone = types.FunctionType(
            func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__
        )
        clone.__kwdefaults__ = func.__kwdefaults__
        clone.__qualname__ = func.__qualname__
        methods[name] = clone
    cls = type(f"LargeChunkSctpTransport{chunk}", (RTCSctpTransport,), methods)
    _large_classes[chunk] = cls
    return cls


def enable_large_send(pc: RTCPeerConnection, packet_size: int) -> int:
    """Send SCTP packets of up to `packet_size` bytes on this link (the remote must have said it can take
    them). Returns the DATA chunk size now used, 0 if nothing changed."""
    dtls = _dtls(pc)
    sctp = pc.sctp
    if not applied() or dtls is None or sctp is None or packet_size < MIN_USEFUL_PACKET:
        return 0
    connection = dtls._ssl
    if not isinstance(connection, _RecordSizedConnection):
        connection = dtls._ssl = _RecordSizedConnection(connection)
    chunk = min(packet_size, DTLS_MAX_PLAINTEXT) - SCTP_OVERHEAD
    chunk -= chunk % 4
    connection.read_size = RECORD_READ_SIZE
    sctp.__class__ = _large_class(chunk)
    return chunk


def large_send_chunk(pc: RTCPeerConnection) -> int:
    """The DATA chunk size this link sends (aiortc's standard one unless `enable_large_send` ran)."""
    sctp = pc.sctp
    if sctp is None:
        return STANDARD_CHUNK
    for chunk, cls in _large_classes.items():
        if type(sctp) is cls:
            return chunk
    return STANDARD_CHUNK
