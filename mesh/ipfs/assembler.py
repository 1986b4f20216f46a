"""Writing a file while its DAG streams in (a CAR in depth-first order): each verified leaf is written at its
offset, which the (earlier) parent nodes give. Raw leaves written this way are not copied into block files:
the file itself holds them (see `filestore.py`). While it is written, a journal records which leaves it holds
(every SYNC_EVERY bytes, after an fdatasync, and when the stream stops), so an interrupted pull resumes from
them (journaled leaves are hashed again when read). Once complete the file is fsynced, renamed into place and
recorded. If anything is missing at the end, the caller fills the gaps and assembles the file with
`reader.assemble_file`; a partial output is never renamed into place. `PublishedFileWriter` does the same
for a file being published (its leaves written once, into the model file)."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from multiformats import CID
from shoal.mesh.ipfs.car import CarBlock, block_parts, contiguous
from shoal.mesh.ipfs.cid import DAG_PB
from shoal.mesh.ipfs.errors import CodecError
from shoal.mesh.ipfs.filestore import FileStore, Journal
from shoal.mesh.ipfs.importer import Block
from shoal.mesh.ipfs.reader import decoded_node
from shoal.mesh.ipfs.store import BlockStore

SYNC_EVERY = 16 << 20

Entry = tuple[bytes, int, int]
"""(multihash, offset, length) of a raw leaf inside the file."""


class StreamingAssembler:
    def __init__(self, root: CID, dest: Path, files: FileStore | None = None, *, fsync: bool = True) -> None:
        self.root = root
        self.dest = dest
        self._files = files
        self._fsync = fsync
        self._offsets: dict[bytes, list[tuple[int, int | None]]] = {bytes(root.digest): [(0, None)]}
        """Multihash → (offset, size its parent claims) of blocks still to come."""
        self._size: int | None = None
        self._written = 0
        self._unsynced = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active_writers = 0
        self._write_lock = threading.Lock()
        self._leaves: list[Entry] = []
        """Every raw leaf written (recorded when the file is complete)."""
        self._unjournaled: list[Entry] = []
        """Leaves written since the last journal append."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._fd, self._tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        self._closed = False
        self._journal: Journal | None = None
        if files is not None:
            try:
                self._journal = files.open_journal(Path(self._tmp), str(root))
            except BaseException:
                os.close(self._fd)
                Path(self._tmp).unlink(missing_ok=True)
                raise

    def plan(self, cid: CID, block: CarBlock) -> tuple[list[int], CarBlock]:
        """Offsets where this block's own file bytes go, and those bytes; registers its children's offsets.
        Call in stream order (parents before children), on the event loop; may see unverified bytes, which
        is harmless: nothing is written before the block is verified, and a bad block ends the stream. A
        block whose size is not what its parent claims is not placed (the fallback assembly handles it)."""
        places = self._offsets.pop(bytes(cid.digest), [])
        if cid.codec.name != DAG_PB:
            if cid == self.root:
                self._size = len(block)
            return [pos for pos, claimed in places if claimed in (None, len(block))], block
        try:
            node = decoded_node(cid, bytes(contiguous(block)))
        except CodecError:
            return [], b""
        if cid == self.root:
            self._size = node.size
        offsets = [pos for pos, claimed in places if claimed in (None, node.size)]
        for base in offsets:
            pos = base + len(node.data)
            for child, size in node.children:
                self._offsets.setdefault(bytes(child.digest), []).append((pos, size))
                pos += size
        return offsets, node.data

    @property
    def size(self) -> int | None:
        """The file size, once the root has been seen."""
        return self._size

    def holds_leaves(self) -> bool:
        """Whether raw leaves written here are kept by the file (a filestore) rather than by block files."""
        return self._files is not None

    def write(self, offsets: list[int], data: CarBlock, leaf: bytes | None = None) -> None:
        """Write verified bytes at their offsets (any thread); `leaf`: the multihash of a raw leaf whose bytes
        these are (the file then holds that block). Every SYNC_EVERY bytes the writing thread flushes the
        file to disk (so the final fsync overlaps with the download; other threads go on writing) and then
        journals the leaves written before.

        A write that arrives after `finish`/`abort` (a worker thread outliving a cancelled stream) is
        dropped: the descriptor is closed then, and its number may already name another open file."""
        with self._lock:
            if self._closed:
                return
            self._active_writers += 1
        try:
            parts = block_parts(data)
            with self._write_lock:  # one writer at a time: the file is written in order anyway
                for offset in offsets:
                    _pwritev_all(self._fd, parts, offset)
            with self._lock:
                n = len(data) * len(offsets)
                self._written += n
                self._unsynced += n
                if leaf is not None and offsets:
                    entry = (leaf, offsets[0], len(data))
                    self._leaves.append(entry)
                    self._unjournaled.append(entry)
                due = self._unsynced >= SYNC_EVERY
                if due:
                    self._unsynced = 0
                    pending, self._unjournaled = self._unjournaled, []
            if due:
                self._checkpoint(pending)
        finally:
            with self._lock:
                self._active_writers -= 1
                self._idle.notify_all()

    def _checkpoint(self, entries: list[Entry]) -> None:
        """Make written leaves durable, then journal them."""
        if self._fsync:
            os.fdatasync(self._fd)
        if self._journal is not None:
            self._journal.append(entries)

    def finish(self) -> bool:
        """Fsync and rename into place if every byte was written, and record the leaves it holds; else keep
        the partial file and its journal for the caller's fallback (or a later resume). Blocking."""
        complete = self._size is not None and self._written == self._size and not self._offsets
        if not complete:
            self.abort()
            return False
        try:
            os.ftruncate(self._fd, self._size or 0)
            if self._fsync:
                os.fsync(self._fd)
        finally:
            self._close()
        os.replace(self._tmp, self.dest)
        if self._files is not None:
            self._files.add_file(self.dest, str(self.root), self._leaves)
        if self._journal is not None:
            self._journal.remove()
        return True

    def _close(self) -> None:
        """Close once no writer is inside `write` (a late writer then finds the file closed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._active_writers:
                self._idle.wait()
        os.close(self._fd)

    def abort(self) -> None:
        """Stop writing. Leaves already written stay available (synced and journaled) for a fallback or a
        later resume; a file that holds none is deleted."""
        with self._lock:
            already = self._closed
        if already:
            return
        try:
            with self._lock:
                pending, self._unjournaled = self._unjournaled, []
            if pending and self._journal is not None:
                self._checkpoint(pending)
        finally:
            self._close()
            if self._journal is None or not self._leaves:
                Path(self._tmp).unlink(missing_ok=True)
                if self._journal is not None:
                    self._journal.remove()
            else:
                self._journal.close()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    _pwritev_all(fd, [data], offset)


def _pwritev_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    """Write the parts back to back at `offset`, however the kernel splits the writes."""
    views = [memoryview(part) for part in parts if len(part)]
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if views and n:
            views[0] = views[0][n:]


class _TempFile:
    """A temp file in the destination's folder, renamed into place only by `install`."""

    def __init__(self, folder: Path, prefix: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.fd, self.path = tempfile.mkstemp(dir=folder, prefix=prefix)
        self._closed = False

    def install(self, dest: Path, *, fsync: bool) -> None:
        try:
            if fsync:
                os.fsync(self.fd)
        finally:
            self.close()
        os.replace(self.path, dest)

    def discard(self) -> None:
        self.close()
        Path(self.path).unlink(missing_ok=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


class PublishedFileWriter:
    """Publishing: the raw leaves of a file being imported are written once, back to back, into a temp file
    that becomes `dest_dir/<root>.gguf` and holds them for the store (a filestore record) instead of block
    files. Other blocks (dag-pb nodes) go to the store. The importer computed each leaf's CID from exactly the
    bytes written. Blocking: call through `asyncio.to_thread`."""

    def __init__(self, store: BlockStore, dest_dir: Path) -> None:
        self.store = store
        self._file = _TempFile(dest_dir, ".publish.gguf.")
        self._pos = 0
        self._leaves: list[Entry] = []

    def sink(self, block: Block) -> None:
        if block.cid.codec.name == DAG_PB:
            self.store.put(block.cid, block.data)
            return
        _pwrite_all(self._file.fd, block.data, self._pos)
        self._leaves.append((bytes(block.cid.digest), self._pos, len(block.data)))
        self._pos += len(block.data)

    def commit(self, root: CID, size: int, dest: Path) -> bool:
        """Rename into place as `dest` and record its leaves if it holds the whole file (a DAG with raw
        leaves); else discard it (dag-pb leaves: the store holds everything). Returns whether it was kept."""
        if self._pos != size or not self._leaves:
            self.discard()
            return False
        self._file.install(dest, fsync=self.store.fsync)
        self.store.files.add_file(dest, str(root), self._leaves)
        self.store.forget_block_files(key for key, _, _ in self._leaves)
        self.store.files.drop_partials(str(root))
        return True

    def discard(self) -> None:
        self._file.discard()


class SparseFileWriter:
    """A file of a known size written piecewise at offsets (the rest stays a hole), renamed into place only
    by `commit`. Blocking methods: call them through `asyncio.to_thread`."""

    def __init__(self, dest: Path, size: int) -> None:
        self.dest = dest
        self._file = _TempFile(dest.parent, f".{dest.name}.")
        os.ftruncate(self._file.fd, size)

    def write_at(self, offset: int, data: bytes) -> None:
        _pwrite_all(self._file.fd, data, offset)

    def commit(self) -> None:
        self._file.install(self.dest, fsync=True)

    def discard(self) -> None:
        self._file.discard()
