"""`mesh.aiortc_tuning`: real aiortc links between real processes on 127.0.0.1 (`tests/mesh/aiortc_pair.py`),
shoal to shoal, shoal to stock aiortc, and under injected datagram loss; plus the pure sizing rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import aiortc
import pytest
from shoal.mesh.p2p import aiortc_tuning as tuning

from tests.mesh.mesh_nodes import REPO, Node, free_port

LARGE_CHUNK = tuning.DTLS_MAX_PLAINTEXT - tuning.SCTP_OVERHEAD


class End:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.mesh.aiortc_pair", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def read(self, timeout_s: float = 90.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"aiortc_pair exited with {self.process.wait()}")
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError("aiortc_pair said nothing in time")

    def write(self, obj: dict[str, Any] | str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def run_pair(offer_args: list[str], answer_args: list[str]) -> tuple[dict, dict, dict]:
    """Link two processes; return (result of the active offer end, its report, the answer end's report)."""
    active, passive = End("offer", *offer_args), End("answer", *answer_args)
    try:
        passive.write(active.read())
        active.write(passive.read())
        assert active.read()["open"] and passive.read()["open"]
        result = active.read(timeout_s=180)
        passive.write("report")
        passive_report = passive.read()
        active.write("report")
        return result, active.read(), passive_report
    finally:
        active.kill()
        passive.kill()


def test_installed_aiortc_is_supported() -> None:
    assert tuning.version_supported(aiortc.__version__)
    assert tuning.version_supported("1.16.3")
    assert not tuning.version_supported("1.17.0")
    assert not tuning.version_supported("2.0.0")


def test_large_packet_size_rules() -> None:
    assert tuning.large_packet_size(16_384, 65_536, 65_536) == 16_384  # loopback: one full DTLS record
    assert tuning.large_packet_size(16_384, 9_000, 9_000) == 9_000 - tuning.PATH_OVERHEAD  # jumbo LAN
    assert tuning.large_packet_size(16_384, 9_000, 1_500) == 0  # the remote's interface is not jumbo
    assert tuning.large_packet_size(16_384, 0, 65_536) == 0  # relayed or unknown path
    assert tuning.large_packet_size(0, 65_536, 65_536) == 0  # the remote cannot take large packets
    assert tuning.large_packet_size(100_000, 65_536, 65_536) == tuning.DTLS_MAX_PLAINTEXT


def test_shoal_to_shoal_uses_large_packets_and_delayed_sacks() -> None:
    result, sender, receiver = run_pair(["shoal", "bulk"], ["shoal", "passive"])
    assert result["chunk"] == LARGE_CHUNK
    assert sender["tuned"] and receiver["tuned"]
    rx = receiver["stats"]
    assert rx["bytes_received"] > 16 * 1_000_000
    # ~16 MB in DTLS records of ~16 KiB, not ~14,000 datagrams of 1.2 KiB ...
    assert rx["bytes_received"] / rx["packets_received"] > 8_000
    # ... and about one SACK per two DATA packets (stock aiortc answers every packet).
    assert rx["packets_sent"] < 0.65 * rx["packets_received"]


def test_untuned_receiver_acknowledges_every_packet() -> None:
    """The counter the test above relies on does tell the two behaviours apart."""
    result, _, receiver = run_pair(["shoal", "bulk", "--untuned"], ["shoal", "passive", "--untuned"])
    assert result["chunk"] == tuning.STANDARD_CHUNK
    rx = receiver["stats"]
    assert rx["bytes_received"] / rx["packets_received"] < 1_300
    assert rx["packets_sent"] > 0.9 * rx["packets_received"]


@pytest.mark.parametrize("shoal_side", ["offer", "answer"])
def test_shoal_with_a_stock_peer_keeps_standard_packets(shoal_side: str) -> None:
    if shoal_side == "offer":
        result, shoal, stock = run_pair(["shoal", "echo"], ["stock", "passive"])
    else:  # the stock end offers; the shoal end (answering) drives the echoes
        active, passive = End("offer", "stock", "passive"), End("answer", "shoal", "echo")
        try:
            passive.write(active.read())
            active.write(passive.read())
            assert active.read()["open"] and passive.read()["open"]
            result = passive.read(timeout_s=180)
            passive.write("report")
            shoal = passive.read()
            active.write("report")
            stock = active.read()
        finally:
            active.kill()
            passive.kill()
    assert result == {"done": "echo", "chunk": tuning.STANDARD_CHUNK}  # every echo matched byte for byte
    assert shoal["tuned"] and not stock["tuned"]
    for report in (shoal, stock):
        stats = report["stats"]
        assert stats["bytes_received"] / stats["packets_received"] < 1_300  # nothing above the standard size


def test_large_packets_and_delayed_sacks_recover_from_loss() -> None:
    lossy = ["--drop-every", "40"]
    result, active, _ = run_pair(["shoal", "echo", *lossy], ["shoal", "passive", *lossy])
    assert result == {"done": "echo", "chunk": LARGE_CHUNK}  # all echoes identical despite the losses
    assert active["stats"]["packets_sent"] > 40  # so some datagrams really were dropped


def test_mesh_nodes_link_with_large_packets(tmp_path: Any) -> None:
    from shoal.mesh.p2p.invite import Invite

    token = Invite.create("tuning").to_token()
    common = ["--invite", token, "--ice", "lo", "--no-mdns", "--gossip", "30"]
    nodes = [Node(f"n{i}", tmp_path / f"n{i}", f"127.0.0.1:{free_port()}", common) for i in range(2)]
    try:
        for node in nodes:
            node.start()
        a, b = nodes
        a.post(f"/test/connect?address={b.api}", b"")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            views = a.peers().get(b.peer_id), b.peers().get(a.peer_id)
            if all(view and view.get("sctp_chunk") == LARGE_CHUNK for view in views):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"links did not switch to large packets: {views}")
        data = os.urandom(900 * 1024 + 17)  # the harness takes request bodies up to 1 MiB
        cid = b.post("/test/blocks", data)["cid"]
        pulled = a.get(f"/test/mesh-block/{cid}?via=channel", timeout=60)  # checked against its CID
        assert pulled.get("size") == len(data) and pulled["stats"] == {"channel": 1}, pulled
    finally:
        for node in nodes:
            node.kill(15)



async def test_lone_sack_waits_only_after_a_quiet_link() -> None:
    """A lone DATA packet after a quiet link is acknowledged LONE_SACK_DELAY_S later (off a stage call's
    critical path); a pair is acknowledged at once; a lone packet within a burst when the loop is idle."""
    import asyncio
    from types import SimpleNamespace

    sent: list[float] = []

    async def original(sctp: Any) -> None:
        sent.append(time.monotonic())
        sctp._sack_needed = False

    send_sack = tuning._delayed_send_sack(original)  # type: ignore[arg-type]
    sctp = SimpleNamespace(_sack_needed=True, _sack_misordered=set(), _sack_duplicates=[])

    async def packet() -> None:
        sctp._sack_needed = True
        await send_sack(sctp)

    async def spin() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    started = time.monotonic()
    await packet()  # the first packet on a quiet link
    await spin()
    assert sent == []  # not at once ...
    await asyncio.sleep(tuning.LONE_SACK_DELAY_S + 0.01)
    assert len(sent) == 1 and sent[0] - started >= tuning.LONE_SACK_DELAY_S * 0.9  # ... but soon

    await packet()  # quiet link again ...
    await packet()  # ... but a second packet follows: the pair is acknowledged at once
    assert len(sent) == 2
    await packet()  # a third, right after: the end of a burst, acknowledged as soon as the loop is idle
    await spin()
    assert len(sent) == 3
    await asyncio.sleep(tuning.LONE_SACK_DELAY_S + 0.01)
    assert len(sent) == 3  # the first packet's timer finds nothing left to acknowledge
