"""One end of a real aiortc link for `test_aiortc_tuning.py`, run as its own process.

    python -m tests.mesh.aiortc_pair (offer|answer) (shoal|stock) ROLE [--untuned] [--drop-every N]

`shoal` ends are real `mesh.peer.Peer` links (with `mesh.aiortc_tuning` applied unless `--untuned`); a
`stock` end is plain aiortc with the same three negotiated channels that echoes every `tensors` message
verbatim (which a `Peer` reads as the reply to its request). ROLE is what the end does once the link is open:

- `echo`: send `tensor` requests of many sizes and check each echo byte for byte;
- `bulk`: stream `tensor` frames one way and ask the other end for the SHA-256 of what it received;
- `passive`: answer (echo tensors, digest bulk frames).

SDP lines go through stdin/stdout (one JSON object per line); after its work an end prints a JSON result, and
on the line `report` it prints its transport counters and exits. `--drop-every N` drops every Nth outgoing
datagram larger than 200 bytes once the link is open (the injected fault: loss).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
from typing import Any

import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from shoal.mesh.p2p import aiortc_tuning
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.ice import enlarge_socket_buffers, restrict_host_addresses
from shoal.mesh.p2p.peer import Handlers, LinkSettings, Peer

ECHO_SIZES = [1, 1_171, 1_172, 1_173, 16_355, 16_356, 16_357, 65_000, 65_536, 200_000, 1_000_000, 3_000_000]
BULK_FRAME = 1_000_000


def _say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def _line() -> str:
    return (await asyncio.to_thread(sys.stdin.readline)).strip()


def _drop_datagrams(every: int) -> None:
    original = aioice.ice.StunProtocol.send_data
    count = 0

    async def send_data(self: aioice.ice.StunProtocol, data: bytes, addr: tuple[str, int]) -> None:
        nonlocal count
        if len(data) > 200:
            count += 1
            if count % every == 0:
                return
        await original(self, data, addr)

    aioice.ice.StunProtocol.send_data = send_data  # type: ignore[method-assign]


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def _negotiate(pc: RTCPeerConnection, offer: bool) -> None:
    if offer:
        await pc.setLocalDescription(await pc.createOffer())
        _say({"sdp": pc.localDescription.sdp, "type": "offer"})
        await pc.setRemoteDescription(RTCSessionDescription(**json.loads(await _line())))
    else:
        await pc.setRemoteDescription(RTCSessionDescription(**json.loads(await _line())))
        await pc.setLocalDescription(await pc.createAnswer())
        _say({"sdp": pc.localDescription.sdp, "type": "answer"})


async def _stats(pc: RTCPeerConnection) -> dict[str, int]:
    """Datagram counters of the link's DTLS transport (`getStats()` leaves out data-channel-only links)."""
    report = pc.sctp.transport._get_stats() if pc.sctp is not None else {}
    for stats in report.values():
        if stats.type == "transport":
            return {"packets_sent": stats.packetsSent, "packets_received": stats.packetsReceived,
                    "bytes_sent": stats.bytesSent, "bytes_received": stats.bytesReceived}
    return {}


async def run_stock(pc: RTCPeerConnection, offer: bool) -> None:
    opened = asyncio.Event()
    channels = {}
    for name, channel_id in p.CHANNEL_IDS.items():
        channel = pc.createDataChannel(name, negotiated=True, id=channel_id)
        channels[name] = channel
    tensors = channels[p.TENSORS]
    tensors.on("message", tensors.send)
    tensors.on("open", opened.set)
    await _negotiate(pc, offer)
    if tensors.readyState != "open":
        await asyncio.wait_for(opened.wait(), 20)
    _say({"open": True})


async def run_shoal(pc: RTCPeerConnection, offer: bool, role: str, drop_every: int) -> Peer:
    handlers = Handlers()
    digest = hashlib.sha256()

    async def on_tensor(peer: Peer, frame: p.BinaryFrame) -> p.BinaryFrame | None:
        if frame.meta.get("bulk"):
            digest.update(frame.payload)
            if not frame.meta.get("last"):
                return None
            return p.BinaryFrame(p.TENSOR, frame.request_id, {"sha256": digest.hexdigest()}, b"")
        return frame

    handlers.on_binary(p.TENSOR, on_tensor)
    settings = LinkSettings(dead_timeout_s=30.0, request_timeout_s=60.0)
    peer = Peer(pc, "remote", "remote", offer, settings, handlers, lambda *_: None, lambda *_: None)
    await _negotiate(pc, offer)
    await peer.wait_open(20)
    peer.start()
    _say({"open": True})
    if drop_every:
        _drop_datagrams(drop_every)
    if role == "echo":
        await asyncio.sleep(0.5)  # let the `link` frames cross first
        for index, size in enumerate(ECHO_SIZES):
            payload = _payload(size, index)
            reply = await peer.request_binary(p.TENSOR, {"i": index}, payload)
            if reply.payload != payload or reply.meta != {"i": index}:
                raise SystemExit(f"echo {index} of {size} bytes came back different")
        _say({"done": "echo", "chunk": aiortc_tuning.large_send_chunk(pc)})
    elif role == "bulk":
        await asyncio.sleep(0.5)
        total = hashlib.sha256()
        frames = 16
        for index in range(frames - 1):
            payload = _payload(BULK_FRAME, 100 + index)
            total.update(payload)
            await peer.send_binary(p.BinaryFrame(p.TENSOR, peer.new_request_id(), {"bulk": 1}, payload))
        payload = _payload(BULK_FRAME, 99)
        total.update(payload)
        reply = await peer.request_binary(p.TENSOR, {"bulk": 1, "last": 1}, payload)
        if reply.meta.get("sha256") != total.hexdigest():
            raise SystemExit("bulk digest differs")
        _say({"done": "bulk", "chunk": aiortc_tuning.large_send_chunk(pc)})
    return peer


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["offer", "answer"])
    parser.add_argument("kind", choices=["shoal", "stock"])
    parser.add_argument("role", choices=["echo", "bulk", "passive"])
    parser.add_argument("--untuned", action="store_true")
    parser.add_argument("--drop-every", type=int, default=0)
    args = parser.parse_args(argv)
    restrict_host_addresses(["127.0.0.1"])
    enlarge_socket_buffers()
    if args.kind == "shoal" and not args.untuned:
        aiortc_tuning.apply()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    offer = args.side == "offer"
    peer = None
    try:
        if args.kind == "stock":
            await run_stock(pc, offer)
        else:
            peer = await run_shoal(pc, offer, args.role, args.drop_every)
        while await _line() != "report":
            pass
        _say({"stats": await _stats(pc), "tuned": aiortc_tuning.applied()})
    finally:
        if peer is not None:
            await peer.close("done")
        await pc.close()


if __name__ == "__main__":
    asyncio.run(main())
