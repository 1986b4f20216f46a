"""File → UnixFS DAG, exactly as Kubo (`ipfs add`) and js-ipfs build it by default: fixed-size chunks of
256 KiB, the balanced layout with at most 174 links per node, CIDv0 (dag-pb leaves) or CIDv1 with raw leaves.

The builder is pure and streaming: feed it chunks, it hands back finished blocks at once and keeps only one
pending row of at most 174 links per tree level, so memory stays flat for a file of any size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from multiformats import CID
from shoal.mesh.ipfs import unixfs
from shoal.mesh.ipfs.cid import DAG_PB, RAW, make_cid
from shoal.mesh.ipfs.dagpb import PBLink, PBNode, encode_node

DEFAULT_CHUNK_SIZE = 256 * 1024
DEFAULT_MAX_LINKS = 174


@dataclass(frozen=True)
class ImportOptions:
    cid_version: int = 1
    """0: CIDv0 and dag-pb leaves (Kubo's default); 1: CIDv1 (with raw leaves unless told otherwise)."""
    raw_leaves: bool | None = None
    """Store chunks as raw blocks; None means: yes for CIDv1, no for CIDv0 (as `ipfs add`)."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Bytes per leaf (Kubo's `size-262144` chunker)."""
    max_links: int = DEFAULT_MAX_LINKS
    """Children per internal node of the balanced layout."""

    def __post_init__(self) -> None:
        if self.cid_version not in (0, 1):
            raise ValueError(f"cid_version must be 0 or 1, not {self.cid_version!r}")
        if self.cid_version == 0 and self.raw_leaves:
            raise ValueError("raw leaves need CIDv1 (a CIDv0 cannot name a raw block)")
        if not 1 <= self.chunk_size <= 1024 * 1024:
            raise ValueError(f"chunk_size must be between 1 byte and 1 MiB, not {self.chunk_size}")
        if self.max_links < 2:
            raise ValueError(f"max_links must be at least 2, not {self.max_links}")

    @property
    def use_raw_leaves(self) -> bool:
        return self.cid_version == 1 if self.raw_leaves is None else self.raw_leaves


class Block(NamedTuple):
    cid: CID
    data: bytes


class _Entry(NamedTuple):
    cid: CID
    tsize: int
    """The child's cumulative DAG size (what a parent link records)."""
    filesize: int
    """File bytes under the child (what a parent's blocksizes record)."""


class FileBuilder:
    """Builds one file's DAG from its chunks. `add_chunk` and `finish` return the blocks they completed."""

    def __init__(self, options: ImportOptions | None = None) -> None:
        self.options = options or ImportOptions()
        self._levels: list[list[_Entry]] = [[]]
        self._size = 0
        self._chunks = 0
        self._finished = False

    @property
    def size(self) -> int:
        return self._size

    def add_chunk(self, chunk: bytes) -> list[Block]:
        if self._finished:
            raise RuntimeError("FileBuilder.add_chunk after finish")
        if len(chunk) > self.options.chunk_size:
            raise ValueError(f"chunk of {len(chunk)} bytes is over the chunk size {self.options.chunk_size}")
        self._size += len(chunk)
        self._chunks += 1
        blocks: list[Block] = []
        entry = self._leaf(chunk, blocks)
        self._push(0, entry, blocks)
        return blocks

    def finish(self) -> tuple[CID, list[Block]]:
        """Close the DAG; return its root CID and the last blocks."""
        if self._finished:
            raise RuntimeError("FileBuilder.finish called twice")
        blocks: list[Block] = []
        if self._chunks == 0:  # an empty file is one empty leaf
            blocks += self.add_chunk(b"")
        self._finished = True
        level = 0
        while True:
            row = self._levels[level]
            higher = any(self._levels[level + 1 :])
            if not higher and len(row) == 1:
                return row[0].cid, blocks
            if row:
                self._levels[level] = []
                parent = self._parent(row, blocks)
                if level + 1 == len(self._levels):
                    self._levels.append([])
                self._levels[level + 1].append(parent)
            level += 1

    def _push(self, level: int, entry: _Entry, blocks: list[Block]) -> None:
        row = self._levels[level]
        row.append(entry)
        if len(row) == self.options.max_links:
            self._levels[level] = []
            if level + 1 == len(self._levels):
                self._levels.append([])
            self._push(level + 1, self._parent(row, blocks), blocks)

    def _leaf(self, chunk: bytes, blocks: list[Block]) -> _Entry:
        if self.options.use_raw_leaves:
            cid = make_cid(chunk, RAW, 1)
            blocks.append(Block(cid, chunk))
            return _Entry(cid, len(chunk), len(chunk))
        payload = unixfs.encode_data(
            unixfs.UnixFSData(type=unixfs.FILE, data=chunk or None, filesize=len(chunk))
        )
        data = encode_node(PBNode(links=(), data=payload))
        cid = make_cid(data, DAG_PB, self.options.cid_version)
        blocks.append(Block(cid, data))
        return _Entry(cid, len(data), len(chunk))

    def _parent(self, children: list[_Entry], blocks: list[Block]) -> _Entry:
        filesize = sum(c.filesize for c in children)
        payload = unixfs.encode_data(
            unixfs.UnixFSData(
                type=unixfs.FILE, filesize=filesize, blocksizes=tuple(c.filesize for c in children)
            )
        )
        links = tuple(PBLink(cid=c.cid, tsize=c.tsize) for c in children)
        data = encode_node(PBNode(links=links, data=payload))
        cid = make_cid(data, DAG_PB, self.options.cid_version)
        blocks.append(Block(cid, data))
        return _Entry(cid, len(data) + sum(c.tsize for c in children), filesize)


def read_chunks(stream: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    """Yield full `chunk_size` chunks from a stream (the last may be shorter), however reads split."""
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            return
        while len(chunk) < chunk_size:
            more = stream.read(chunk_size - len(chunk))
            if not more:
                break
            chunk += more
        yield chunk
        if len(chunk) < chunk_size:
            return


@dataclass(frozen=True)
class ImportResult:
    root: CID
    size: int
    """File bytes."""
    blocks: int
    """Blocks produced (including any the sink already had)."""


def import_stream(
    stream: BinaryIO, sink: Callable[[Block], None], options: ImportOptions | None = None
) -> ImportResult:
    """Chunk a stream into a DAG, giving each block to `sink` as soon as it is complete. Blocking."""
    builder = FileBuilder(options)
    count = 0
    for chunk in read_chunks(stream, builder.options.chunk_size):
        for block in builder.add_chunk(chunk):
            sink(block)
            count += 1
    root, last = builder.finish()
    for block in last:
        sink(block)
        count += 1
    return ImportResult(root=root, size=builder.size, blocks=count)


def import_file(
    path: str | Path, sink: Callable[[Block], None] | None = None, options: ImportOptions | None = None
) -> ImportResult:
    """Import a file from disk (blocking; run it in an executor from async code)."""
    with open(path, "rb") as stream:
        return import_stream(stream, sink or (lambda _block: None), options)
