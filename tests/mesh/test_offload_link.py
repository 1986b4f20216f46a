"""An offload's tokens over a direct link (mesh/split/offload_link.py): the record codec (a tampered,
oversized, replayed or reflected record, a wrong request id, a body past its frame's limit end the link), real
TCP links on 127.0.0.1 through a real `TensorLinkServer`: a grant made for an offload is parked until its
claim, frames arrive whole and in order however the stream is cut, the serving end hears an origin that
goes away, and an origin hears a link that ends before the request's done."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from shoal.mesh.p2p.protocol import ControlFrame
from shoal.mesh.split import offload_link as ol
from shoal.mesh.split import tensor_link as tl
from shoal.mesh.split import wire
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.tensor_link_server import TensorLinkServer

RID = 0x1234_5678


def token(index: int, **extra: Any) -> dict[str, Any]:
    return {"rid": RID, "index": index, "token": 100 + index, "text": f"t{index}", "prompt_tokens": 9,
            "completion_tokens": index + 1, "finish": None, **extra}


def pair() -> tuple[tl.Sealer, tl.Sealer]:
    """(the serving end's sealer, the origin's) of one link."""
    key = os.urandom(32)
    return tl.Sealer(key, tl.TO_ORIGIN), tl.Sealer(key, tl.TO_STAGE)


# --- the codec --------------------------------------------------------------------------------------------

def test_records_round_trip_whole_in_any_cut() -> None:
    server, origin = pair()
    frames = [(wire.OFFLOAD_TOKEN, token(i)) for i in range(5)] + [(wire.OFFLOAD_DONE, {"rid": RID})]
    stream = b"".join(server.seal(ol.encode_record(RID, t, b)) for t, b in frames)
    for cut in (1, 3, 7, len(stream)):  # a fresh pair per cut: each direction counts its records
        server, origin = pair()
        stream = b"".join(server.seal(ol.encode_record(RID, t, b)) for t, b in frames)
        reader, got = ol.RecordReader(origin), []
        for at in range(0, len(stream), cut):
            got += [ol.decode_record(p, RID) for p in reader.feed(stream[at:at + cut])]
        assert [(f.type, f.body) for f in got] == frames


def test_a_tampered_record_fails() -> None:
    server, origin = pair()
    record = bytearray(server.seal(ol.encode_record(RID, wire.OFFLOAD_TOKEN, token(0))))
    record[12] ^= 1
    with pytest.raises(tl.LinkError, match="authentication"):
        ol.RecordReader(origin).feed(bytes(record))


def test_a_replayed_or_reflected_record_fails() -> None:
    server, origin = pair()
    record = server.seal(ol.encode_record(RID, wire.OFFLOAD_TOKEN, token(0)))
    reader = ol.RecordReader(origin)
    assert len(reader.feed(record)) == 1
    with pytest.raises(tl.LinkError):  # the same record again: the counter moved on
        reader.feed(record)
    _, origin2 = pair()
    own = origin2.seal(ol.encode_record(RID, wire.OFFLOAD_TOKEN, token(0)))
    with pytest.raises(tl.LinkError):  # a record sent back the way it came
        ol.RecordReader(origin2).feed(own)


def test_an_oversized_length_fails_before_its_body() -> None:
    _, origin = pair()
    with pytest.raises(tl.LinkError, match="out of bounds"):
        ol.RecordReader(origin).feed(struct.pack("<I", ol.MAX_RECORD + 1))
    with pytest.raises(tl.LinkError, match="out of bounds"):  # shorter than a tag
        ol.RecordReader(origin).feed(struct.pack("<I", 3) + b"abc")
    assert ol.MAX_RECORD < 10_000  # a record is a control frame's size, not a tensor's


def test_a_body_past_its_frames_limit_is_refused_both_ways() -> None:
    big = token(0, text="x" * 7000)
    with pytest.raises(ValueError, match="exceeds"):
        ol.encode_record(RID, wire.OFFLOAD_TOKEN, big)
    plaintext = struct.pack("<IB", RID, 1) + orjson.dumps(big)  # a peer that does not check
    with pytest.raises(tl.LinkError, match="out of bounds"):
        ol.decode_record(plaintext, RID)
    with pytest.raises(ValueError):
        ol.encode_record(RID, wire.OFFLOAD_OPEN, {"rid": RID})  # only the serving side's frames


@pytest.mark.parametrize("plaintext, why", [
    (struct.pack("<IB", RID + 1, 1) + orjson.dumps(token(0)), "request"),
    (struct.pack("<IB", RID, 1) + orjson.dumps({**token(0), "rid": RID + 1}), "object of request"),
    (struct.pack("<IB", RID, 1) + orjson.dumps({**token(0), "rid": True}), "object of request"),
    (struct.pack("<IB", RID, 9) + orjson.dumps(token(0)), "kind"),
    (struct.pack("<IB", RID, 1) + b"{not json", "JSON"),
    (struct.pack("<IB", RID, 2) + b"[1, 2]", "object"),
    (b"\x01\x02", "shorter"),
])
def test_a_record_of_another_request_or_shape_fails(plaintext: bytes, why: str) -> None:
    with pytest.raises(tl.LinkError, match=why):
        ol.decode_record(plaintext, RID)


# --- real links -------------------------------------------------------------------------------------------

@asynccontextmanager
async def listening(ttl_s: float = 10.0) -> AsyncIterator[TensorLinkServer]:
    served: list[Any] = []
    server = TensorLinkServer(served.append, SplitConfig(link_token_ttl_s=ttl_s))
    server.start("127.0.0.1")
    try:
        yield server
    finally:
        server.stop()
    assert served == []  # an offload link never reaches the stage worker


class Origin:
    """What the origin's `OffloadClient` does with a receiver: the frames in order, and any loss."""

    def __init__(self) -> None:
        self.frames: list[ControlFrame] = []
        self.lost: list[tuple[str, bool]] = []
        self.ended = asyncio.Event()

    def deliver(self, frame: ControlFrame) -> None:
        self.frames.append(frame)
        if frame.type in ol.ENDS:
            self.ended.set()

    def on_lost(self, reason: str, malformed: bool) -> None:
        self.lost.append((reason, malformed))
        self.ended.set()

    async def connect(self, grant: dict[str, Any]) -> ol.TokenReceiver:
        def receiver(sealer: tl.Sealer) -> ol.TokenReceiver:
            return ol.TokenReceiver(sealer, RID, self.deliver, self.on_lost)

        return await ol.connect("127.0.0.1", grant, receiver, 2.0, 5.0)


async def test_an_offload_link_is_parked_for_its_claim_and_carries_the_frames_in_order() -> None:
    async with listening() as server:
        grant = server.grant("peer-a", park=True)
        assert type(grant["lid"]) is int
        origin = Origin()
        receiver = await origin.connect(grant)
        assert server.claim("peer-b", grant["lid"]) is None  # another peer cannot take it
        link = server.claim("peer-a", grant["lid"])
        assert link is not None and server.claim("peer-a", grant["lid"]) is None  # claimed once
        sender = await ol.attach(link.sock, link.sealer, RID, 5.0)
        for i in range(40):
            await sender.send(wire.OFFLOAD_TOKEN, token(i))
        await sender.send(wire.OFFLOAD_DONE, {"rid": RID, "receipt": {"x": 1}})
        sender.close()
        await asyncio.wait_for(origin.ended.wait(), 10)
        assert [f.body.get("index") for f in origin.frames[:-1]] == list(range(40))
        assert origin.frames[-1] == ControlFrame(wire.OFFLOAD_DONE, {"rid": RID, "receipt": {"x": 1}})
        assert origin.lost == [] and receiver.frames == 41
        with pytest.raises(tl.LinkError):
            await sender.send(wire.OFFLOAD_TOKEN, token(41))


async def test_an_unclaimed_link_expires_and_a_stage_grant_is_not_parked() -> None:
    async with listening(ttl_s=0.2) as server:
        grant = server.grant("peer-a", park=True)
        origin = Origin()
        await origin.connect(grant)
        await asyncio.sleep(0.4)
        assert server.claim("peer-a", grant["lid"]) is None  # expired: closed by the server
        await asyncio.wait_for(origin.ended.wait(), 10)
        assert origin.frames == [] and origin.lost and not origin.lost[0][1]
        assert "lid" not in server.grant("peer-a")


async def test_the_origin_hears_a_link_that_ends_early_or_breaks_the_format() -> None:
    async with listening() as server:
        grant = server.grant("peer-a", park=True)
        origin = Origin()
        await origin.connect(grant)
        link = server.claim("peer-a", grant["lid"])
        assert link is not None
        sender = await ol.attach(link.sock, link.sealer, RID, 5.0)
        await sender.send(wire.OFFLOAD_TOKEN, token(0))
        sender.close()  # no done
        await asyncio.wait_for(origin.ended.wait(), 10)
        assert len(origin.frames) == 1 and len(origin.lost) == 1 and origin.lost[0][1] is False

        grant = server.grant("peer-a", park=True)
        origin = Origin()
        await origin.connect(grant)
        link = server.claim("peer-a", grant["lid"])
        assert link is not None
        link.sock.sendall(link.sealer.seal(struct.pack("<IB", RID + 1, 1) + orjson.dumps(token(0))))
        await asyncio.wait_for(origin.ended.wait(), 10)
        assert origin.frames == [] and origin.lost[0][1] is True and "request" in origin.lost[0][0]
        link.close()


async def test_the_serving_end_hears_an_origin_that_goes_away() -> None:
    async with listening() as server:
        grant = server.grant("peer-a", park=True)
        origin = Origin()
        receiver = await origin.connect(grant)
        link = server.claim("peer-a", grant["lid"])
        assert link is not None
        sender = await ol.attach(link.sock, link.sealer, RID, 5.0)
        gone = asyncio.Event()
        sender.on_lost = gone.set
        await sender.send(wire.OFFLOAD_TOKEN, token(0))
        receiver.close()  # the origin cancelled (or died)
        await asyncio.wait_for(gone.wait(), 10)
        with pytest.raises(tl.LinkError):
            await sender.send(wire.OFFLOAD_TOKEN, token(1))
        assert origin.lost == []  # closing its own end is no loss


async def test_a_drop_of_the_peer_ends_its_parked_and_claimed_links() -> None:
    async with listening() as server:
        grants = [server.grant("peer-a", park=True) for _ in range(2)]
        origins = [Origin(), Origin()]
        for origin, grant in zip(origins, grants, strict=True):
            await origin.connect(grant)
        link = server.claim("peer-a", grants[0]["lid"])
        assert link is not None
        await ol.attach(link.sock, link.sealer, RID, 5.0)
        server.drop_peer("peer-a")
        for origin in origins:
            await asyncio.wait_for(origin.ended.wait(), 10)
            assert origin.lost
        assert server.claim("peer-a", grants[1]["lid"]) is None
