"""CARv1 streams of a DAG from the local store, depth-first (file order), in batches.

Raw leaves that a filestore file holds back to back (a model this node pulled or published) are read with
one `preadv` per batch straight into the framed output buffer: no block files, no per-block reads, no
copies in Python. The file is trusted while it matches the guard of its record (checked on the open file);
otherwise (or for block files) each block goes through `BlockStore.get`, which re-hashes filestore leaves of
a changed file.

`produce` reads leaf runs that are already in the page cache on the event loop itself, ~1 MiB at a time
(`preadv` with `RWF_NOWAIT`, which never waits for the disk): a copy that size costs less than a hop to a
worker thread and back, and it is still in the CPU cache when it is sent. Everything else — interior
nodes, block files, re-hashed leaves, data that must come from disk — is read in a worker thread, ~4 MiB at
a time. On loopback this cut the serving node's CPU per CAR by a tenth to a fifth on a quiet machine, and
by a third with the cores shared, against a worker thread for every 4 MiB (see docs/mesh.md). (Sending each
leaf with `loop.sendfile` was tried: 380 drain-and-sendfile rounds per model took twice as long as these
copies; and on this VM `sendfile` to a loopback socket moves less in all than `preadv` + `send`.)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

from multiformats import CID
from shoal.mesh.ipfs import car
from shoal.mesh.ipfs.cid import DAG_PB, cid_to_bytes
from shoal.mesh.ipfs.errors import IpfsError
from shoal.mesh.ipfs.filestore import Guard
from shoal.mesh.ipfs.protobuf import encode_varint
from shoal.mesh.ipfs.reader import decoded_node
from shoal.mesh.ipfs.store import BlockStore

BATCH_BYTES = 4 << 20
"""A batch read in a worker thread."""
INLINE_BATCH_BYTES = 1 << 20
"""A batch read on the event loop (`next_batch(nowait=True)`): small enough to stay in the CPU cache."""
FIRST_BATCH_BYTES = 256 << 10
"""The first batch is small, so the first bytes go out sooner."""
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
"""`preadv` flag: fail rather than wait for the disk (Linux); without it every batch goes to a thread."""

Buffer = bytes | memoryview
"""A part of the stream (leaf runs come as views of the producer's buffers: Python 3.11's asyncio copies only
the unsent rest of a view, twice of a bytearray; later versions keep the view)."""


class CarProducer:
    """Call `next_batch` from a worker thread (or `next_batch(nowait=True)` anywhere) until `done`; or use
    `produce`."""

    def __init__(self, store: BlockStore, root: CID, *, scope: str = "all", reuse_buffers: bool = False
                 ) -> None:
        self.store = store
        self.root = root
        self.scope = scope
        self._arenas: list[bytearray] | None = [bytearray(), bytearray()] if reuse_buffers else None
        """With `reuse_buffers`, batches alternate between two buffers (no zero-filled 4 MiB per batch). A
        buffer that anything still holds a view of (a transport's unsent rest, say) is never overwritten: a
        fresh one takes its place."""
        self._turn = 0
        """Which of the two buffers the next batch uses."""
        self._arena: bytearray | None = None
        """The buffer of the batch being read (None until it needs one)."""
        self._arena_used = 0
        self._budget = BATCH_BYTES
        """The batch being read: at most about this many bytes."""
        self._stack = [root]
        self._header = True
        self._first = True
        self._untrusted: set[str] = set()
        """Files whose guard failed during this stream: their leaves go through `store.get`."""

    @property
    def done(self) -> bool:
        return not self._stack and not self._header

    def next_batch(self, *, nowait: bool = False) -> list[Buffer] | None:
        """The next ~4 MiB of the CAR as a few buffers (small sections joined, leaf runs as read). With
        `nowait` (for the event loop): only the next ~1 MiB that needs no disk, no block file and no
        hashing — runs of raw leaves from a trusted file already in the page cache — ending before anything
        else; None (and nothing consumed) when not even the first can be read that way."""
        if nowait and _RWF_NOWAIT is None:
            return None
        out: list[Buffer] = []
        small: list[bytes] = []
        self._arena, self._arena_used = None, 0
        if self._header:
            small.append(car.encode_header([self.root]))
            self._header = False
        size = 0
        budget = FIRST_BATCH_BYTES if self._first else INLINE_BATCH_BYTES if nowait else BATCH_BYTES
        self._budget = budget
        while self._stack and size < budget:
            cid = self._stack[-1]
            if self.scope == "all" and cid.codec.name != DAG_PB and cid != self.root:
                run = self._leaf_run(budget - size, nowait)
                if run is not None:
                    if small:
                        out.append(b"".join(small))
                        small = []
                    out.append(run)
                    size += len(run)
                    continue
            if nowait:
                break
            self._stack.pop()
            block = self.store.get(cid)
            if block is None:
                raise IpfsError(f"block {cid} of {self.root} is not in the local store")
            small.extend(car.section_parts(cid, block))
            size += len(block)
            if self.scope == "all" and cid.codec.name == DAG_PB:
                self._stack.extend(child for child, _ in reversed(decoded_node(cid, block).children))
        if small:
            out.append(b"".join(small))
        if not out:  # only with `nowait`: the header went out before, and nothing else could be read
            return None
        self._first = self._first and not size
        if self._arena is not None:
            self._turn ^= 1
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

    def _leaf_run(self, budget: int, nowait: bool) -> memoryview | None:
        """Sections of the raw leaf on top of the stack and those after it that sit right behind it in the
        same trusted file, read with one preadv (and taken off the stack); None, with the stack as it was,
        when that cannot be done (with `nowait`: also when not all of it is in the page cache)."""
        first = self._stack[-1]
        found = self.store.files.location(bytes(first.digest))
        if found is None or found[0] in self._untrusted:
            return None
        path, start, length, guard = found
        leaves = [(first, length)]
        end = start + length
        for i in range(len(self._stack) - 2, -1, -1):
            nxt = self._stack[i]
            if end - start >= budget or nxt.codec.name == DAG_PB or nxt == self.root:
                break
            more = self.store.files.location(bytes(nxt.digest))
            if more is None or more[0] != path or more[1] != end or more[3] != guard:
                break
            leaves.append((nxt, more[2]))
            end += more[2]
        heads = [_section_head(cid, length) for cid, length in leaves]
        whole = self._space(sum(len(h) for h in heads) + end - start)
        views = _frame(whole, heads, [n for _, n in leaves])
        read = _read_into(path, guard, views, start, nowait=nowait)
        if read is None:
            return None  # not in the page cache: a worker thread reads it
        if read != end - start:
            self._untrusted.add(path)
            return None
        del self._stack[len(self._stack) - len(leaves) :]
        return whole

    def _space(self, n: int) -> memoryview:
        """`n` bytes of output space: in this batch's reusable buffer, else a fresh one."""
        if self._arenas is None:
            return memoryview(bytearray(n))
        if self._arena is None:  # the batch's first run: the buffer of the batch before the last
            self._arena = self._arenas[self._turn]
            if _exported(self._arena):
                self._arena = self._arenas[self._turn] = bytearray()
        start = self._arena_used
        if len(self._arena) < start + n:
            # Too small: a new, bigger one (views of the old one may still be alive, so never resize it).
            self._arena = self._arenas[self._turn] = _arena(max(n, self._budget + (1 << 20)))
            start = 0
        self._arena_used = start + n
        return memoryview(self._arena)[start : start + n]


def _arena(n: int) -> bytearray:
    """A zeroed buffer of `n` bytes with room for one more, so `_exported` never reallocates it."""
    buffer = bytearray(n + 1)
    del buffer[n:]
    return buffer


def _exported(buffer: bytearray) -> bool:
    """Whether any view of `buffer` is alive (a bytearray cannot change size while one is)."""
    try:
        buffer.append(0)
    except BufferError:
        return True
    del buffer[-1]
    return False


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


def _read_into(path: str, guard: Guard, views: list[memoryview], offset: int, *, nowait: bool = False
               ) -> int | None:
    """preadv the file into `views` if it still matches `guard`: bytes read, -1 if it does not match (or is
    gone); with `nowait`, None unless all of it was in the page cache."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return -1
    try:
        if Guard.of(os.fstat(fd)) != guard:
            return -1
        total = 0
        want = sum(len(v) for v in views)
        if nowait:
            try:
                total = os.preadv(fd, views, offset, _RWF_NOWAIT)  # type: ignore[arg-type]
            except OSError:  # BlockingIOError: not cached; or a file system without RWF_NOWAIT
                return None
            return total if total == want else None  # a short read: the rest is not cached (or the
            # file is shorter, which the blocking read then finds out)
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
    """The producer's buffers: batches that need no disk read on the event loop (`next_batch(nowait=True)`),
    the others in a worker thread. With a buffer-reusing producer, a part's bytes stay as they are while
    anything holds a view of it."""
    while not producer.done:
        parts = producer.next_batch(nowait=True)
        if parts is None:
            parts = await asyncio.to_thread(producer.next_batch)
        for part in parts:
            yield part


def iter_car(store: BlockStore, root: CID, *, scope: str = "all") -> Iterator[Buffer]:
    """The whole CAR, blocking (for tests and small archives)."""
    producer = CarProducer(store, root, scope=scope)
    while not producer.done:
        yield from producer.next_batch() or []
