"""The few protobuf wire-format pieces dag-pb and UnixFS need: varints and length-delimited fields."""

from __future__ import annotations

from collections.abc import Iterator

from shoal.mesh.ipfs.errors import CodecError

VARINT = 0
LENGTH_DELIMITED = 2
MAX_VARINT_BYTES = 10


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("protobuf varints here are unsigned")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a varint at `pos`; return (value, next position)."""
    result = 0
    shift = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise CodecError("truncated varint")
        byte = data[pos + i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if i > 0 and byte == 0:
                raise CodecError("non-minimal varint")
            return result, pos + i + 1
        shift += 7
    raise CodecError("varint longer than 10 bytes")


def key(field: int, wire_type: int) -> bytes:
    return encode_varint(field << 3 | wire_type)


def varint_field(field: int, value: int) -> bytes:
    return key(field, VARINT) + encode_varint(value)


def bytes_field(field: int, value: bytes) -> bytes:
    return key(field, LENGTH_DELIMITED) + encode_varint(len(value)) + value


def iter_fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) for each field; values are ints or bytes."""
    pos = 0
    end = len(data)
    while pos < end:
        tag, pos = decode_varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise CodecError("protobuf field number 0")
        if wire_type == VARINT:
            value, pos = decode_varint(data, pos)
            yield field, wire_type, value
        elif wire_type == LENGTH_DELIMITED:
            length, pos = decode_varint(data, pos)
            if pos + length > end:
                raise CodecError("truncated length-delimited protobuf field")
            yield field, wire_type, bytes(data[pos : pos + length])
            pos += length
        else:
            raise CodecError(f"unsupported protobuf wire type {wire_type} (field {field})")
