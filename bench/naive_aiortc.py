"""Baseline for bench/mesh_link.py: one plain aiortc data channel between two processes, bulk transfer with a
`bufferedAmount` loop — "one naive aiortc link". Offer/answer travel over the child's stdin/stdout.

    python bench/naive_aiortc.py [MiB]      # prints MiB/s
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

CHUNK = 65_536


def _loopback() -> None:
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


async def sender(total: int) -> None:
    _loopback()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("bulk", negotiated=True, id=0)
    low = asyncio.Event()
    channel.bufferedAmountLowThreshold = 1 << 20
    channel.on("bufferedamountlow", low.set)
    offer = json.loads(await asyncio.to_thread(sys.stdin.readline))
    await pc.setRemoteDescription(RTCSessionDescription(**offer))
    await pc.setLocalDescription(await pc.createAnswer())
    print(json.dumps({"sdp": pc.localDescription.sdp, "type": "answer"}), flush=True)
    opened = asyncio.Event()
    channel.on("open", opened.set)
    if channel.readyState != "open":
        await opened.wait()
    payload, sent = b"x" * CHUNK, 0
    while sent < total:
        if channel.bufferedAmount > 4 << 20:
            low.clear()
            await low.wait()
        channel.send(payload)
        sent += CHUNK
    await asyncio.sleep(3600)  # the receiver kills this process when it has everything


async def receiver(child: subprocess.Popen[str], total: int) -> float:
    _loopback()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("bulk", negotiated=True, id=0)
    done, state = asyncio.Event(), {"bytes": 0, "start": 0.0}

    def on_message(data: bytes) -> None:
        if not state["bytes"]:
            state["start"] = time.perf_counter()
        state["bytes"] += len(data)
        if state["bytes"] >= total:
            done.set()

    channel.on("message", on_message)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        child.stdin.write(json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"}) + "\n")
        child.stdin.flush()
        answer = json.loads(await asyncio.to_thread(child.stdout.readline))
        await pc.setRemoteDescription(RTCSessionDescription(**answer))
        await asyncio.wait_for(done.wait(), 600)
        return (state["bytes"] - CHUNK) / (time.perf_counter() - state["start"]) / 2**20
    finally:
        child.kill()
        child.wait()
        await pc.close()


def measure(mib: int) -> float:
    """MiB/s of one plain aiortc data channel between two processes on loopback."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--send", str(mib << 20)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return asyncio.run(receiver(child, mib << 20))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--send":
        asyncio.run(sender(int(sys.argv[2])))
    else:
        print(f"{measure(int(sys.argv[1]) if len(sys.argv) > 1 else 16):.2f}")
