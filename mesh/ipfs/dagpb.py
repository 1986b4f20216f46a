"""The dag-pb codec (PBNode/PBLink), written the way Kubo and js-ipfs write it: links first, each with
Hash, Name (even when empty) and Tsize, then Data."""

from __future__ import annotations

from dataclasses import dataclass

from multiformats import CID
from shoal.mesh.ipfs import protobuf as pb
from shoal.mesh.ipfs.cid import cid_from_bytes
from shoal.mesh.ipfs.errors import CodecError, InvalidCidError

MAX_LINKS = 100_000


@dataclass(frozen=True)
class PBLink:
    cid: CID
    """The child block."""
    tsize: int
    """Cumulative size of the child's DAG: its block plus all blocks below it."""
    name: str = ""
    """Link name; empty inside a UnixFS file."""


@dataclass(frozen=True)
class PBNode:
    links: tuple[PBLink, ...]
    data: bytes | None
    """The node's payload; for UnixFS, an encoded `unixfs.Data` message."""


def encode_node(node: PBNode) -> bytes:
    out = bytearray()
    for link in node.links:
        body = (
            pb.bytes_field(1, bytes(link.cid))
            + pb.bytes_field(2, link.name.encode("utf-8"))
            + pb.varint_field(3, link.tsize)
        )
        out += pb.bytes_field(2, body)
    if node.data is not None:
        out += pb.bytes_field(1, node.data)
    return bytes(out)


def _decode_link(body: bytes) -> PBLink:
    cid: CID | None = None
    name = ""
    tsize = 0
    for field, wire_type, value in pb.iter_fields(body):
        if field == 1 and wire_type == pb.LENGTH_DELIMITED:
            try:
                cid = cid_from_bytes(value)  # type: ignore[arg-type]
            except Exception as exc:  # multiformats raises several exception types
                raise CodecError(f"dag-pb link with a bad CID: {exc}") from None
        elif field == 2 and wire_type == pb.LENGTH_DELIMITED:
            try:
                name = value.decode("utf-8")  # type: ignore[union-attr]
            except UnicodeDecodeError:
                raise CodecError("dag-pb link name is not UTF-8") from None
        elif field == 3 and wire_type == pb.VARINT:
            tsize = int(value)  # type: ignore[arg-type]
        else:
            raise CodecError(f"unexpected field {field} in a dag-pb link")
    if cid is None:
        raise CodecError("dag-pb link without a Hash")
    return PBLink(cid=cid, tsize=tsize, name=name)


def decode_node(block: bytes) -> PBNode:
    links: list[PBLink] = []
    data: bytes | None = None
    try:
        for field, wire_type, value in pb.iter_fields(block):
            if field == 2 and wire_type == pb.LENGTH_DELIMITED:
                if data is not None:
                    raise CodecError("dag-pb Links after Data")
                links.append(_decode_link(value))  # type: ignore[arg-type]
                if len(links) > MAX_LINKS:
                    raise CodecError("dag-pb node with too many links")
            elif field == 1 and wire_type == pb.LENGTH_DELIMITED:
                if data is not None:
                    raise CodecError("dag-pb node with two Data fields")
                data = value  # type: ignore[assignment]
            else:
                raise CodecError(f"unexpected field {field} in a dag-pb node")
    except InvalidCidError as exc:
        raise CodecError(str(exc)) from None
    return PBNode(links=tuple(links), data=data)
