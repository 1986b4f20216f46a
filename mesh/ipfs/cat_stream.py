"""A file DAG from an IPFS node's RPC API as blocks, with its leaves cut from one `cat` of the file.

IPFS nodes send a file's bytes (`cat`) much faster than its blocks (`dag/export`): js-ipfs takes 0.27-0.32 s
to `cat` the 94 MiB default model on loopback and 0.43-0.52 s to export it as a CAR. For a DAG with raw
leaves (CIDv1, as shoal and `ipfs add --raw-leaves` build it) a leaf block *is* its slice of the file, so
the slices of one `cat` are the leaf blocks: `stream_blocks` fetches the interior nodes with `block/get`
(verified here, since they say where the file is cut), then yields them (parents first) and each leaf's
slice under its CID, in file order. Nothing is trusted: the fetcher hashes every yielded block against its
CID, so a node that sends wrong bytes fails the whole stream, as a bad CAR would. A DAG with dag-pb leaves
(CIDv0) raises `NotRawLeaves` before any block is yielded; the caller exports it as a CAR instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from multiformats import CID
from shoal.mesh.ipfs.car import MAX_SECTION, CarBlock, ChunkBuffer, http_body_chunks
from shoal.mesh.ipfs.cid import DAG_PB, verify_block
from shoal.mesh.ipfs.errors import CodecError, SourceError
from shoal.mesh.ipfs.reader import decode_file_node

MAX_INTERIOR_NODES = 1 << 16
"""Interior nodes one file may have (174 leaves each: ~2.9 TB of 256 KiB chunks): bounds the walk."""
INTERIOR_FETCHES = 8
"""`block/get` requests in flight while walking the interior nodes."""

GetBlock = Callable[[CID], Awaitable[bytes]]


class NotRawLeaves(Exception):
    """The DAG's leaves are dag-pb nodes (not slices of the file): it cannot be cut from a `cat`."""


async def _interior(root: CID, get_block: GetBlock) -> tuple[list[tuple[CID, bytes]], list[tuple[CID, int]]]:
    """The verified interior nodes, level by level from the root, and the leaves (CID, size) in file order."""
    nodes: list[tuple[CID, bytes]] = []
    level: list[tuple[CID, int | None]] = [(root, None)]
    leaves: list[tuple[CID, int]] = []
    limit = asyncio.Semaphore(INTERIOR_FETCHES)

    async def fetch(cid: CID) -> bytes:
        async with limit:
            block = await get_block(cid)
        verify_block(cid, block)  # its links decide where the file is cut
        return block

    while level:
        if len(nodes) + len(level) > MAX_INTERIOR_NODES:
            raise SourceError(f"{root}: more than {MAX_INTERIOR_NODES} interior nodes")
        try:  # a group, not gather: one failure ends the level's other fetches too
            async with asyncio.TaskGroup() as group:
                fetches = [group.create_task(fetch(cid)) for cid, _ in level]
        except* Exception as eg:
            raise eg.exceptions[0] from None
        blocks = [task.result() for task in fetches]
        following: list[tuple[CID, int | None]] = []
        for (cid, _), block in zip(level, blocks, strict=True):
            node = decode_file_node(cid, block)
            if not node.children:
                raise NotRawLeaves(f"{cid} is a dag-pb leaf")
            nodes.append((cid, block))
            for child, size in node.children:
                if child.codec.name == DAG_PB:
                    following.append((child, size))
                else:
                    leaves.append((child, size))
        if following and leaves:  # raw leaves beside deeper nodes: not a layout the cut can follow in order
            raise NotRawLeaves(f"{root}: leaves at several depths")
        level = following
    return nodes, leaves


async def stream_blocks(
    root: CID, get_block: GetBlock, open_cat: Callable[[], Awaitable[aiohttp.ClientResponse]]
) -> AsyncIterator[tuple[CID, CarBlock]]:
    """The blocks of the file DAG under `root`: interior nodes, then each raw leaf cut from `open_cat()`
    (a response streaming the whole file), which starts while the interior is walked."""
    if root.codec.name != DAG_PB:  # a one-block file
        yield root, await get_block(root)
        return
    cat = asyncio.ensure_future(open_cat())
    try:
        try:
            nodes, leaves = await _interior(root, get_block)
        except CodecError as exc:
            raise SourceError(f"{root}: {exc}") from exc
        for item in nodes:
            yield item
        response = await cat
        received = ChunkBuffer(http_body_chunks(response))
        for cid, size in leaves:
            if size > MAX_SECTION or not await received.fill(size):
                raise SourceError(f"cat of {root} ended before leaf {cid}")
            yield cid, received.take(size)  # views of the received chunks: no copy
        if await received.fill(1):
            raise SourceError(f"cat of {root} is longer than its DAG")
    finally:
        if not cat.done():
            cat.cancel()
        await asyncio.wait([cat])  # raises only if this task is cancelled (never swallows that)
        if not cat.cancelled() and cat.exception() is None:
            cat.result().close()
