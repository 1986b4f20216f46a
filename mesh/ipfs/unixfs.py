"""The UnixFS `Data` message carried in dag-pb nodes (only what files need: type, data, sizes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.mesh.ipfs import protobuf as pb
from shoal.mesh.ipfs.errors import CodecError

RAW = 0
DIRECTORY = 1
FILE = 2
METADATA = 3
SYMLINK = 4
HAMT_SHARD = 5
FILE_TYPES = frozenset({RAW, FILE})


@dataclass(frozen=True)
class UnixFSData:
    type: int
    """UnixFS node type: FILE (2) for files; RAW (0) in very old imports."""
    data: bytes | None = None
    """File bytes held in this node itself (a leaf), or None."""
    filesize: int | None = None
    """Total file bytes under this node."""
    blocksizes: tuple[int, ...] = field(default=())
    """File bytes under each child link, in link order."""


def encode_data(msg: UnixFSData) -> bytes:
    out = pb.varint_field(1, msg.type)
    if msg.data is not None:
        out += pb.bytes_field(2, msg.data)
    if msg.filesize is not None:
        out += pb.varint_field(3, msg.filesize)
    for size in msg.blocksizes:
        out += pb.varint_field(4, size)
    return out


def decode_data(payload: bytes) -> UnixFSData:
    kind: int | None = None
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: list[int] = []
    for number, wire_type, value in pb.iter_fields(payload):
        if number == 1 and wire_type == pb.VARINT:
            kind = int(value)  # type: ignore[arg-type]
        elif number == 2 and wire_type == pb.LENGTH_DELIMITED:
            data = value  # type: ignore[assignment]
        elif number == 3 and wire_type == pb.VARINT:
            filesize = int(value)  # type: ignore[arg-type]
        elif number == 4 and wire_type == pb.VARINT:
            blocksizes.append(int(value))  # type: ignore[arg-type]
        elif number == 4 and wire_type == pb.LENGTH_DELIMITED:  # packed encoding, allowed by proto2 readers
            pos = 0
            raw = value
            while pos < len(raw):  # type: ignore[arg-type]
                size, pos = pb.decode_varint(raw, pos)  # type: ignore[arg-type]
                blocksizes.append(size)
        elif number in (5, 6, 7, 8):  # hashType, fanout, mode, mtime: not used by files we read
            continue
        else:
            raise CodecError(f"unexpected field {number} in UnixFS Data")
    if kind is None:
        raise CodecError("UnixFS Data without a Type")
    return UnixFSData(type=kind, data=data, filesize=filesize, blocksizes=tuple(blocksizes))
