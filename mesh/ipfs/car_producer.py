"""CARv1 streams of a DAG from the local store, depth-first (file order), in batches of about 4 MiB.

Raw leaves that a filestore file holds back to back (a model this node pulled or published) are read with
one `preadv` per batch straight into the framed output buffer: no block files, no per-block reads, no
copies in Python. The file is trusted while it matches the guard of its record (checked on the open file);
otherwise (or for block files) each block goes through `BlockStore.get`, which re-hashes filestore leaves of
a changed file. (Sending each leaf with `loop.sendfile` was tried: 380 drain-and-sendfile rounds per model
took twice as long as these copies.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator

from multiformats import CID

from mesh.ipfs import car
from mesh.ipfs.cid import DAG_PB, cid_to_bytes
from mesh.ipfs.errors import IpfsError
from mesh.ipfs.filestore import Guard
from mesh.ipfs.protobuf import encode_varint
from mesh.ipfs.reader import decoded_node
from mesh.ipfs.store import BlockStore

BATCH_BYTES = 4 << 20
FIRST_BATCH_BYTES = 256 << 10
"""The first batch is small, so the first bytes go out sooner."""

Buffer = bytes | memoryview
"""A part of the stream (leaf runs come as views: asyncio copies only the unsent rest of a view, twice of
a bytearray)."""


class CarProducer:
    """Blocking: call `next_batch` from a worker thread until `done` (or use `produce`)."""

    def __init__(self, store: BlockStore, root: CID, *, scope: str = "all", reuse_buffers: bool = False
                 ) -> None:
        self.store = store
        self.root = root
        self.scope = scope
        self._arenas: list[bytearray] | None = [bytearray(), bytearray()] if reuse_buffers else None
        """With `reuse_buffers`, batches alternate between two buffers (no zero-filled 4 MiB per batch): a
        batch's parts are overwritten when the next-but-one batch is read, so consume them before that."""
        self._arena = bytearray()
        self._arena_used = 0
        self._stack = [root]
        self._header = True
        self._first = True
        self._untrusted: set[str] = set()
        """Files whose guard failed during this stream: their leaves go through `store.get`."""

    @property
    def done(self) -> bool:
        return not self._stack and not self._header

    def next_batch(self) -> list[Buffer]:
        """The next ~4 MiB of the CAR as a few buffers (small sections joined, leaf runs as read)."""
        out: list[Buffer] = []
        small: list[bytes] = []
        if self._arenas is not None:
            self._arenas.reverse()
            self._arena, self._arena_used = self._arenas[0], 0
        if self._header:
            small.append(car.encode_header([self.root]))
            self._header = False
        size = 0
        budget = FIRST_BATCH_BYTES if self._first else BATCH_BYTES
        self._first = False
        while self._stack and size < budget:
            cid = self._stack.pop()
            if self.scope == "all" and cid.codec.name != DAG_PB and cid != self.root:
                run = self._leaf_run(cid, budget - size)
                if run is not None:
                    if small:
                        out.append(b"".join(small))
                        small = []
                    out.append(run)
                    size += len(run)
                    continue
            block = self.store.get(cid)
            if block is None:
                raise IpfsError(f"block {cid} of {self.root} is not in the local store")
            small.extend(car.section_parts(cid, block))
            size += len(block)
            if self.scope == "all" and cid.codec.name == DAG_PB:
                self._stack.extend(child for child, _ in reversed(decoded_node(cid, block).children))
        if small:
            out.append(b"".join(small))
        return out

    def total_size(self) -> int:
        """Bytes of the whole CAR, from metadata (dag-pb nodes are read; leaves only looked up or stat'ed).
        Raises IpfsError if a block is missing."""
        total = len(car.encode_header([self.root]))
        stack = [self.root]
        while stack:
            cid = stack.pop()
            length = self._leaf_length(cid) if cid.codec.name != DAG_PB else None
            if length is None:
                block = self.store.get(cid)
                if block is None:
                    raise IpfsError(f"block {cid} of {self.root} is not in the local store")
                length = len(block)
                if self.scope == "all" and cid.codec.name == DAG_PB:
                    stack.extend(child for child, _ in decoded_node(cid, block).children)
            raw = len(cid_to_bytes(cid))
            total += len(encode_varint(raw + length)) + raw + length
            if self.scope != "all":
                break
        return total

    def _leaf_length(self, cid: CID) -> int | None:
        found = self.store.files.location(bytes(cid.digest))
        if found is not None:
            return found[2]
        try:
            return os.stat(self.store.path_of(cid)).st_size
        except FileNotFoundError:
            return None

    def _leaf_run(self, first: CID, budget: int) -> memoryview | None:
        """Sections of `first` and the raw leaves after it that sit right behind it in the same trusted
        file, read with one preadv; None (and `first` back on the stack) when that cannot be done."""
        found = self.store.files.location(bytes(first.digest))
        if found is None or found[0] in self._untrusted:
            return None
        path, start, length, guard = found
        leaves = [(first, length)]
        end = start + length
        while self._stack and end - start < budget:
            nxt = self._stack[-1]
            if nxt.codec.name == DAG_PB or nxt == self.root:
                break
            more = self.store.files.location(bytes(nxt.digest))
            if more is None or more[0] != path or more[1] != end or more[3] != guard:
                break
            self._stack.pop()
            leaves.append((nxt, more[2]))
            end += more[2]
        heads = [_section_head(cid, length) for cid, length in leaves]
        whole = self._space(sum(len(h) for h in heads) + end - start)
        views = _frame(whole, heads, [n for _, n in leaves])
        if _read_into(path, guard, views, start) != end - start:
            self._untrusted.add(path)
            self._stack.extend(cid for cid, _ in reversed(leaves))
            return None
        return whole

    def _space(self, n: int) -> memoryview:
        """`n` bytes of output space: in the current reusable buffer, else a fresh one."""
        if self._arenas is None:
            return memoryview(bytearray(n))
        start = self._arena_used
        if len(self._arena) < start + n:
            # Too small: a new, bigger one (views of the old one may still be alive, so never resize it).
            self._arena = self._arenas[0] = bytearray(max(n, BATCH_BYTES + (1 << 20)))
            start = 0
        self._arena_used = start + n
        return memoryview(self._arena)[start : start + n]


def _section_head(cid: CID, length: int) -> bytes:
    raw = cid_to_bytes(cid)
    return encode_varint(len(raw) + length) + raw


def _frame(whole: memoryview, heads: list[bytes], lengths: list[int]) -> list[memoryview]:
    """Write each section header into `whole`, leaving after each a view for its block's bytes."""
    views: list[memoryview] = []
    pos = 0
    for head, length in zip(heads, lengths, strict=True):
        whole[pos : pos + len(head)] = head
        pos += len(head)
        views.append(whole[pos : pos + length])
        pos += length
    return views


def _read_into(path: str, guard: Guard, views: list[memoryview], offset: int) -> int:
    """preadv the file into `views` if it still matches `guard`; bytes read, or -1."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return -1
    try:
        if Guard.of(os.fstat(fd)) != guard:
            return -1
        total = 0
        want = sum(len(v) for v in views)
        pending = list(views)
        while pending:
            n = os.preadv(fd, pending, offset + total)
            if n <= 0:
                break
            total += n
            pending = _advance(pending, n)
        return total if total == want else -1
    finally:
        os.close(fd)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The views still to fill after `n` more bytes were read into them."""
    out: list[memoryview] = []
    for view in views:
        if n >= len(view):
            n -= len(view)
            continue
        out.append(view[n:])
        n = 0
    return out


async def produce(producer: CarProducer) -> AsyncIterator[Buffer]:
    """The producer's buffers, each batch read in a worker thread while the previous one is being sent.
    With a buffer-reusing producer, consume (send or copy) each part before asking for the next."""
    pending: asyncio.Future[list[Buffer]] | None = asyncio.ensure_future(
        asyncio.to_thread(producer.next_batch))
    try:
        while pending is not None:
            parts = await pending
            pending = None if producer.done else asyncio.ensure_future(asyncio.to_thread(producer.next_batch))
            for part in parts:
                yield part
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, IpfsError, OSError):
                await pending


def iter_car(store: BlockStore, root: CID, *, scope: str = "all") -> Iterator[Buffer]:
    """The whole CAR, blocking (for tests and small archives)."""
    producer = CarProducer(store, root, scope=scope)
    while not producer.done:
        yield from producer.next_batch()
