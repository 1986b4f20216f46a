"""Pure codecs: protobuf varints, dag-pb, UnixFS, CAR, CID parsing, the streaming importer's shape."""

from __future__ import annotations

import functools
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shoal.mesh.ipfs import car, dagpb, protobuf, unixfs
from shoal.mesh.ipfs.cid import RAW, cid_to_bytes, make_cid, parse_cid, verify_block, verify_pieces
from shoal.mesh.ipfs.errors import CodecError, InvalidCidError, VerificationError
from shoal.mesh.ipfs.importer import FileBuilder, ImportOptions, import_stream
from shoal.mesh.ipfs.reader import decode_file_node


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = protobuf.encode_varint(value)
    assert protobuf.decode_varint(encoded, 0) == (value, len(encoded))


def test_varint_rejects_truncation_and_overlong() -> None:
    with pytest.raises(CodecError):
        protobuf.decode_varint(b"\x80\x80", 0)
    with pytest.raises(CodecError):
        protobuf.decode_varint(b"\xff" * 11, 0)


@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=64), st.integers(0, 2**40)), max_size=20),
    st.one_of(st.none(), st.binary(max_size=300)),
)
def test_dagpb_round_trip(children: list[tuple[bytes, int]], data: bytes | None) -> None:
    links = tuple(dagpb.PBLink(cid=make_cid(raw, RAW, 1), tsize=size) for raw, size in children)
    node = dagpb.PBNode(links=links, data=data)
    assert dagpb.decode_node(dagpb.encode_node(node)) == node


@given(st.binary(max_size=200), st.lists(st.integers(0, 2**40), max_size=30))
def test_unixfs_round_trip(data: bytes, sizes: list[int]) -> None:
    msg = unixfs.UnixFSData(
        type=unixfs.FILE, data=data or None, filesize=len(data) + sum(sizes), blocksizes=tuple(sizes)
    )
    assert unixfs.decode_data(unixfs.encode_data(msg)) == msg


@given(st.binary(max_size=100))
def test_decoders_never_crash_on_garbage(garbage: bytes) -> None:
    for decode in (dagpb.decode_node, unixfs.decode_data, car.decode_header):
        try:
            decode(garbage)
        except CodecError:
            pass


def test_parse_cid_errors_are_clear() -> None:
    for bad in ("", "hello", "Qm123", "bafy" + "z" * 300, "bafkqaaa"):  # the last: identity hash
        with pytest.raises(InvalidCidError):
            parse_cid(bad)
    cid = parse_cid("QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o")
    assert cid.version == 0 and cid.codec.name == "dag-pb"


def test_verify_block() -> None:
    cid = make_cid(b"abc", RAW, 1)
    verify_block(cid, b"abc")
    with pytest.raises(VerificationError):
        verify_block(cid, b"abd")


async def test_car_round_trip_both_cid_versions() -> None:
    blocks: list = []
    root = import_stream(io.BytesIO(b"x" * 700_000), blocks.append, ImportOptions(cid_version=0)).root
    blocks.append(type(blocks[0])(make_cid(b"raw", RAW, 1), b"raw"))
    body = car.encode_header([root]) + b"".join(car.encode_section(b.cid, b.data) for b in blocks)
    got = [(roots, cid, data) async for roots, cid, data in car.read_car_chunks(car.in_memory(body))]
    assert [(c, d) for _, c, d in got] == [(b.cid, b.data) for b in blocks]
    assert got[0][0] == [root]


async def test_truncated_car_raises() -> None:
    block = b"some block"
    cid = make_cid(block, RAW, 1)
    body = car.encode_header([cid]) + car.encode_section(cid, block)
    with pytest.raises(CodecError):
        async for _ in car.read_car_chunks(car.in_memory(body[:-3])):
            pass
    with pytest.raises(CodecError):
        async for _ in car.read_car_chunks(car.in_memory(b"\x05garbage")):
            pass


def chunked(body: bytes, sizes: list[int]) -> car.ReadChunk:
    """A `read_chunk` handing out `body` in pieces of the given sizes, in turn."""
    pos = 0
    turn = 0

    async def read_chunk() -> bytes:
        nonlocal pos, turn
        size = sizes[turn % len(sizes)]
        turn += 1
        piece = body[pos : pos + size]
        pos += len(piece)
        return piece

    return read_chunk


@functools.cache
def _car_of_mixed_blocks() -> tuple[list, bytes]:
    blocks: list = []
    import_stream(io.BytesIO(make_data_bytes(700_000)), blocks.append, ImportOptions(cid_version=0))
    root = blocks[-1].cid
    for data in (b"", b"tiny", make_data_bytes(300_000)):
        blocks.append(type(blocks[0])(make_cid(data, RAW, 1), data))
    body = car.encode_header([root]) + b"".join(car.encode_section(b.cid, b.data) for b in blocks)
    return blocks, body


def make_data_bytes(size: int) -> bytes:
    import random

    return random.Random(size).randbytes(size)


@settings(deadline=None, max_examples=40)
@given(st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=6).filter(
    lambda sizes: sum(sizes) >= 200 * len(sizes)))  # 1-byte chunks only, over 1.3 MB: too slow to matter
async def test_chunked_car_reader_matches_whole_reads(sizes: list[int]) -> None:
    """However the stream is cut (inside varints, CIDs, blocks), the chunk reader yields the same sections
    as the exact reader; blocks split over chunks come as `Pieces` that hash like the whole block."""
    blocks, body = _car_of_mixed_blocks()
    got = [(cid, block) async for _, cid, block in car.read_car_chunks(chunked(body, sizes))]
    assert [cid for cid, _ in got] == [b.cid for b in blocks]
    for (cid, block), want in zip(got, blocks, strict=True):
        assert len(block) == len(want.data)
        assert bytes(car.contiguous(block)) == want.data
        verify_pieces(cid, car.block_parts(block))  # raises if the pieces do not hash to the CID


async def test_chunked_car_reader_splits_big_blocks_into_pieces_without_copying() -> None:
    _, body = _car_of_mixed_blocks()
    got = [block async for _, _, block in car.read_car_chunks(chunked(body, [65536]))]
    big = got[-1]
    assert isinstance(big, car.Pieces) and len(big.parts) >= 4
    assert all(isinstance(part, memoryview) for part in big.parts)


async def test_chunked_car_reader_rejects_truncation_and_garbage() -> None:
    _, body = _car_of_mixed_blocks()
    for cut in (3, len(body) // 2, len(body) - 1):
        with pytest.raises(CodecError):
            async for _ in car.read_car_chunks(chunked(body[:cut], [1000])):
                pass
    with pytest.raises(CodecError):
        async for _ in car.read_car_chunks(chunked(b"\x05garbage", [4])):
            pass
    header = car.encode_header([make_cid(b"x", RAW, 1)])
    with pytest.raises(CodecError, match="out of range"):
        async for _ in car.read_car_chunks(chunked(header + protobuf.encode_varint(5 << 20), [64])):
            pass


def test_verify_pieces_rejects_a_changed_piece() -> None:
    data = make_data_bytes(100_000)
    cid = make_cid(data, RAW, 1)
    verify_pieces(cid, [data[:10], memoryview(data)[10:60_000], data[60_000:]])
    with pytest.raises(VerificationError):
        verify_pieces(cid, [data[:10], data[11:]])


def test_cid_to_bytes_matches_multiformats() -> None:
    from multiformats import CID

    for cid in (make_cid(b"a", RAW, 1), make_cid(b"b", "dag-pb", 1), make_cid(b"c", "dag-pb", 0),
                CID("base32", 1, "raw", ("sha2-512", b"\x00" * 64))):
        assert cid_to_bytes(cid) == bytes(cid)


def test_balanced_layout_shape() -> None:
    """175 leaves with 174 links per node: a root with two children, the second holding one leaf."""
    options = ImportOptions(cid_version=1, chunk_size=16, max_links=174)
    builder = FileBuilder(options)
    blocks = []
    for i in range(175):
        blocks += builder.add_chunk(bytes([i % 256]) * 16)
    root, last = builder.finish()
    blocks += last
    by_cid = {b.cid: b.data for b in blocks}
    top = decode_file_node(root, by_cid[root])
    assert [size for _, size in top.children] == [174 * 16, 16]
    assert len(decode_file_node(top.children[1][0], by_cid[top.children[1][0]]).children) == 1
    assert top.size == 175 * 16


def test_import_options_validation() -> None:
    with pytest.raises(ValueError):
        ImportOptions(cid_version=0, raw_leaves=True)
    with pytest.raises(ValueError):
        ImportOptions(cid_version=2)
