"""Pure codecs: protobuf varints, dag-pb, UnixFS, CAR, CID parsing, the streaming importer's shape."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.ipfs import car, dagpb, protobuf, unixfs
from mesh.ipfs.cid import RAW, make_cid, parse_cid, verify_block
from mesh.ipfs.errors import CodecError, InvalidCidError, VerificationError
from mesh.ipfs.importer import FileBuilder, ImportOptions, import_stream
from mesh.ipfs.reader import decode_file_node


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
    got = [(roots, cid, data) async for roots, cid, data in car.read_car(car.bytes_reader(body))]
    assert [(c, d) for _, c, d in got] == [(b.cid, b.data) for b in blocks]
    assert got[0][0] == [root]


async def test_truncated_car_raises() -> None:
    block = b"some block"
    cid = make_cid(block, RAW, 1)
    body = car.encode_header([cid]) + car.encode_section(cid, block)
    with pytest.raises(CodecError):
        async for _ in car.read_car(car.bytes_reader(body[:-3])):
            pass
    with pytest.raises(CodecError):
        async for _ in car.read_car(car.bytes_reader(b"\x05garbage")):
            pass


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
