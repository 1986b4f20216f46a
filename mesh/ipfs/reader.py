"""Reading UnixFS files: byte ranges `[offset, offset + length)` that fetch only the blocks covering them,
and (blocking) assembly of a complete local DAG into a plain file."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from multiformats import CID
from shoal.mesh.ipfs import dagpb, unixfs
from shoal.mesh.ipfs.cid import DAG_PB
from shoal.mesh.ipfs.errors import BlockNotFoundError, CodecError
from shoal.mesh.ipfs.store import BlockStore

GetBlock = Callable[[CID], Awaitable[bytes]]


@dataclass(frozen=True)
class FileNode:
    """A decoded UnixFS file node: its own bytes (a leaf) or its children with their file sizes."""

    data: bytes
    children: tuple[tuple[CID, int], ...]
    size: int


def decode_file_node(cid: CID, block: bytes) -> FileNode:
    if cid.codec.name != DAG_PB:
        return FileNode(data=block, children=(), size=len(block))
    node = dagpb.decode_node(block)
    if node.data is None:
        raise CodecError(f"{cid}: dag-pb node without UnixFS data")
    info = unixfs.decode_data(node.data)
    if info.type not in unixfs.FILE_TYPES:
        raise CodecError(f"{cid}: not a UnixFS file (type {info.type})")
    if len(info.blocksizes) != len(node.links):
        raise CodecError(f"{cid}: {len(node.links)} links but {len(info.blocksizes)} blocksizes")
    own = info.data or b""
    size = len(own) + sum(info.blocksizes)
    if info.filesize is not None and info.filesize != size:
        raise CodecError(f"{cid}: filesize {info.filesize} does not match its parts ({size})")
    children = tuple((link.cid, bs) for link, bs in zip(node.links, info.blocksizes, strict=True))
    return FileNode(data=own, children=children, size=size)


@functools.lru_cache(maxsize=256)
def decoded_node(cid: CID, block: bytes) -> FileNode:
    """`decode_file_node`, remembered per (CID, exact bytes), so a pure function of its input: a pull plans,
    counts and walks the same few dag-pb nodes (174 links each), and a gateway reads them for every CAR."""
    return decode_file_node(cid, block)


class UnixFSReader:
    """Random access to UnixFS files through `get_block` (e.g. `Fetcher.get_block`, which verifies)."""

    def __init__(self, get_block: GetBlock) -> None:
        self._get_block = get_block

    async def node(self, cid: CID) -> FileNode:
        return decode_file_node(cid, await self._get_block(cid))

    async def size(self, root: CID) -> int:
        return (await self.node(root)).size

    async def read(self, root: CID, offset: int, length: int) -> bytes:
        """Bytes `[offset, offset + length)` of the file, clipped at its end."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        return await self._read(root, offset, offset + length)

    async def _read(self, cid: CID, start: int, end: int) -> bytes:
        node = await self.node(cid)
        end = min(end, node.size)
        if start >= end:
            return b""
        own = node.data[start:end]
        pos = len(node.data)
        jobs = []
        for child, size in node.children:
            lo, hi = max(start, pos), min(end, pos + size)
            if lo < hi:
                jobs.append(self._read(child, lo - pos, hi - pos))
            pos += size
        return own + b"".join(await asyncio.gather(*jobs))


Part = tuple[CID | None, "bytes | Path"]


def iter_file_parts(store: BlockStore, root: CID) -> Iterator[Part]:
    """The file's contents in order from a store holding the whole DAG (blocking), as (raw leaf CID or None,
    bytes or the path of a stored raw leaf's block file, whose content is exactly that part, so it can be
    copied in the kernel). Filestore leaves come as bytes (re-hashed unless their file is unchanged)."""
    stack: list[CID] = [root]
    while stack:
        cid = stack.pop()
        if cid.codec.name != DAG_PB and cid != root:
            path = store.path_of(cid)
            if path.is_file():
                yield cid, path
                continue
            data = store.files.get(bytes(cid.digest))
            if data is None:
                raise BlockNotFoundError(f"block {cid} of {root} is not in the local store")
            yield cid, data
            continue
        block = store.get(cid)
        if block is None:
            raise BlockNotFoundError(f"block {cid} of {root} is not in the local store")
        node = decode_file_node(cid, block)
        if node.data:
            yield None, node.data
        stack.extend(child for child, _ in reversed(node.children))


def _copy_leaf(path: Path, out: BinaryIO) -> int:
    """Append a stored raw leaf to `out`, in the kernel where it can (copy_file_range)."""
    with path.open("rb") as leaf:
        size = os.fstat(leaf.fileno()).st_size
        out.flush()
        copied = 0
        try:
            while copied < size:
                n = os.copy_file_range(leaf.fileno(), out.fileno(), size - copied)
                if n == 0:
                    break
                copied += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        if copied < size:
            leaf.seek(copied)
            shutil.copyfileobj(leaf, out)
    return size


def write_file(store: BlockStore, root: CID, out: BinaryIO, leaves: list[tuple[bytes, int, int]] | None = None
               ) -> int:
    """Write the file to `out`; with `leaves`, append (multihash, offset, length) of every raw leaf written
    (their real lengths, whatever the parents claim)."""
    written = 0
    for cid, part in iter_file_parts(store, root):
        n = _copy_leaf(part, out) if isinstance(part, Path) else out.write(part)
        if leaves is not None and cid is not None:
            leaves.append((bytes(cid.digest), written, n))
        written += n
    return written


def assemble_file(store: BlockStore, root: CID, dest: Path, *, keep_leaves: bool = False) -> int:
    """Write the file under `root` to `dest` atomically (temp, fsync, rename); return its size (blocking).

    With `keep_leaves`, `dest` then holds the raw leaves for the store (a filestore record): their block
    files and the root's partial pull files are deleted, so the bytes are on disk once."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    leaves: list[tuple[bytes, int, int]] = []
    try:
        with os.fdopen(fd, "wb") as out:
            size = write_file(store, root, out, leaves)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if keep_leaves:
        store.files.add_file(dest, str(root), leaves)
        store.forget_block_files(key for key, _, _ in leaves)
        store.files.drop_partials(str(root))
    return size
