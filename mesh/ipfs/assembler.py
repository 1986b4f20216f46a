"""Writing a file while its DAG streams in (a CAR in depth-first order): each verified leaf is written at its
offset, which the (earlier) parent nodes give. If anything is missing at the end, the caller falls back to
`reader.assemble_file`; a partial output is never renamed into place."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from multiformats import CID

from mesh.ipfs.errors import CodecError
from mesh.ipfs.reader import decode_file_node

SYNC_EVERY = 16 << 20


class StreamingAssembler:
    def __init__(self, root: CID, dest: Path) -> None:
        self.root = root
        self.dest = dest
        self._offsets: dict[bytes, list[int]] = {bytes(root.digest): [0]}
        self._size: int | None = None
        self._written = 0
        self._unsynced = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active_writers = 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._fd, self._tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        self._closed = False

    def plan(self, cid: CID, block: bytes) -> tuple[list[int], bytes]:
        """Offsets where this block's own file bytes go, and those bytes; registers its children's offsets.
        Call in stream order (parents before children), on the event loop; may see unverified bytes, which
        is harmless: nothing is written before the block is verified, and a bad block ends the stream."""
        offsets = self._offsets.pop(bytes(cid.digest), [])
        try:
            node = decode_file_node(cid, block)
        except CodecError:
            return [], b""
        if cid == self.root:
            self._size = node.size
        for base in offsets:
            pos = base + len(node.data)
            for child, size in node.children:
                self._offsets.setdefault(bytes(child.digest), []).append(pos)
                pos += size
        return offsets, node.data

    @property
    def size(self) -> int | None:
        """The file size, once the root has been seen."""
        return self._size

    def write(self, offsets: list[int], data: bytes) -> None:
        """Write verified bytes at their offsets (any thread). Every SYNC_EVERY bytes the writing thread
        also flushes the file to disk, so the final fsync overlaps with the download, not after it.

        A write that arrives after `finish`/`abort` (a worker thread outliving a cancelled stream) is
        dropped: the descriptor is closed then, and its number may already name another open file."""
        with self._lock:
            if self._closed:
                return
            self._active_writers += 1
        try:
            for offset in offsets:
                view = memoryview(data)
                pos = offset
                while view:
                    n = os.pwrite(self._fd, view, pos)
                    view = view[n:]
                    pos += n
                with self._lock:
                    self._written += len(data)
                    self._unsynced += len(data)
                    sync = self._unsynced >= SYNC_EVERY
                    if sync:
                        self._unsynced = 0
                if sync:
                    os.fdatasync(self._fd)
        finally:
            with self._lock:
                self._active_writers -= 1
                self._idle.notify_all()

    def finish(self) -> bool:
        """Fsync and rename into place if every byte was written; else discard. Blocking."""
        complete = self._size is not None and self._written == self._size and not self._offsets
        try:
            if complete:
                os.ftruncate(self._fd, self._size or 0)
                os.fsync(self._fd)
        finally:
            self._close()
        if complete:
            os.replace(self._tmp, self.dest)
        else:
            Path(self._tmp).unlink(missing_ok=True)
        return complete

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
        self._close()
        Path(self._tmp).unlink(missing_ok=True)


class SparseFileWriter:
    """A file of a known size written piecewise at offsets (the rest stays a hole), renamed into place only
    by `commit`. Blocking methods: call them through `asyncio.to_thread`."""

    def __init__(self, dest: Path, size: int) -> None:
        self.dest = dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._fd, self._tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        self._closed = False
        os.ftruncate(self._fd, size)

    def write_at(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def commit(self) -> None:
        os.fsync(self._fd)
        self._close()
        os.replace(self._tmp, self.dest)

    def discard(self) -> None:
        self._close()
        Path(self._tmp).unlink(missing_ok=True)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
