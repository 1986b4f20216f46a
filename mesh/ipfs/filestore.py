"""Filestore: raw leaves kept *inside* files the IPFS layer wrote itself (assembled models, a pull's temp
file) and recorded as (file, offset, length) instead of being copied into block files, as Kubo's `--nocopy`
filestore does. Every byte is then written once, and a node can serve a model it pulled from the model file.

One record per backing file, under `ipfs/filestore/`:

- `<id>.idx` — a complete file (e.g. `models/<cid>.gguf`), written atomically after the file was fsynced and
  renamed into place. Its header holds a guard taken then (device, inode, size, mtime, ctime). While the file
  still matches it, reads trust the record: the bytes were hashed against their CIDs before they were written.
  Once it does not (the file was edited, touched, replaced), every entry is re-hashed once, the entries that
  no longer match are dropped and the guard is renewed — wrong bytes are never served.
- `<id>.journal` — a file still being written (a pull's temp file): appended after each `fdatasync` with the
  verified leaves written so far, so an interrupted (even `kill -9`ed) pull resumes from them. Reads of a
  journal's entries are always re-hashed (the file is not complete, and no guard covers it).

The record format is in `filestore_records.py`. All methods block; async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from shoal.mesh.ipfs.cid import parse_cid
from shoal.mesh.ipfs.errors import InvalidCidError, StoreError
from shoal.mesh.ipfs.filestore_records import (
    INDEX,
    JOURNAL,
    FileRecord,
    Guard,
    entry_lines,
    hashes_to,
    key_bytes,
    key_text,
    parse,
    record_name,
    serialise,
)

logger = logging.getLogger(__name__)

__all__ = ["FileStore", "Guard", "Journal", "key_bytes", "key_text"]


class FileStore:
    """The filestore records of one block store. Thread-safe; other processes' new or removed records are
    noticed on the next lookup miss."""

    def __init__(self, root: Path, tmp_dir: Path, *, fsync: bool = True) -> None:
        self.dir = root
        self._tmp_dir = tmp_dir
        self._fsync = fsync
        self._lock = threading.RLock()
        self._records: dict[str, FileRecord] = {}
        self._inodes: dict[str, int] = {}
        self._by_key: dict[bytes, str] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the filestore at {self.dir}: {exc}") from exc
        self.refresh()

    # --- loading ------------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Load records added or rewritten by anyone (also other processes), forget removed ones; return
        whether anything changed."""
        with self._lock:
            seen: dict[str, int] = {}
            with os.scandir(self.dir) as entries:
                for entry in entries:
                    if entry.name.endswith((INDEX, JOURNAL)):
                        seen[entry.name] = entry.inode()
            if seen == self._inodes:
                return False
            for name in set(self._records) - set(seen):
                del self._records[name]
            for name, inode in seen.items():
                if self._inodes.get(name) != inode or name not in self._records:
                    self._load(name)
            self._inodes = seen
            self._rebuild_keys()
            return True

    def _load(self, name: str) -> None:
        try:
            raw = (self.dir / name).read_bytes()
        except FileNotFoundError:
            self._records.pop(name, None)
            return
        except OSError as exc:
            raise StoreError(f"cannot read filestore record {name}: {exc}") from exc
        record = parse(name, raw)
        if record is None:
            logger.warning("ignoring unreadable filestore record %s", name)
            self._records.pop(name, None)
        else:
            self._records[name] = record

    def _rebuild_keys(self) -> None:
        """Complete records win over journals: their reads need no hashing."""
        by_key: dict[bytes, str] = {}
        for record in sorted(self._records.values(), key=lambda r: not r.partial):
            for key in record.entries:
                by_key[key] = record.name
        self._by_key = by_key

    def _lookup(self, key: bytes) -> tuple[FileRecord, int, int] | None:
        with self._lock:
            name = self._by_key.get(key)
            if name is None and self.refresh():
                name = self._by_key.get(key)
            if name is None:
                return None
            record = self._records[name]
            offset, length = record.entries[key]
            return record, offset, length

    # --- reading ------------------------------------------------------------------------------------------
    def has(self, key: bytes) -> bool:
        """Whether the leaf is recorded in a file that still holds it (a changed complete file is re-hashed
        first; a journal's leaves are hashed when read)."""
        found = self._lookup(key)
        if found is None:
            return False
        record, offset, length = found
        try:
            st = os.stat(record.path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot stat {record.path}: {exc}") from exc
        if record.guard is not None and Guard.of(st) != record.guard:
            self.revalidate(record.name)
            with self._lock:
                fresh = self._records.get(record.name)
                return fresh is not None and key in fresh.entries
        return st.st_size >= offset + length

    def get(self, key: bytes) -> bytes | None:
        """The leaf's bytes, or None when no file holds them (any more). Trusted only under a valid guard."""
        found = self._lookup(key)
        if found is None:
            return None
        record, offset, length = found
        try:
            fd = os.open(record.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot open {record.path}: {exc}") from exc
        try:
            st = os.fstat(fd)
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise StoreError(f"cannot read {record.path}: {exc}") from exc
        finally:
            os.close(fd)
        if record.guard is not None and Guard.of(st) == record.guard and len(data) == length:
            return data
        if len(data) == length and hashes_to(key, data):
            return data
        logger.warning("%s no longer holds leaf %s at %d: dropped", record.path, key_text(key), offset)
        if record.guard is not None:
            self.revalidate(record.name)
        else:
            self._forget(record.name, [key])
        return None

    def revalidate(self, name: str) -> None:
        """Re-hash every entry of a complete record whose file changed; keep those that still match and
        renew the guard (left off if the file changed again meanwhile, so reads hash until the next check)."""
        with self._lock:
            record = self._records.get(name)
            if record is None or record.guard is None:
                return
            try:
                fd = os.open(record.path, os.O_RDONLY)
            except FileNotFoundError:
                self._remove(record, delete_file=False)
                return
            try:
                before = Guard.of(os.fstat(fd))
                if before == record.guard:
                    return
                good = {k: v for k, v in record.entries.items() if _holds(fd, k, *v)}
                after = Guard.of(os.fstat(fd))
            finally:
                os.close(fd)
            logger.warning("%s changed: %d of %d leaves still match", record.path, len(good),
                           len(record.entries))
            guard = after if after == before else None
            whole = record.whole and len(good) == len(record.entries)
            self._write_record(FileRecord(record.name, record.path, record.root, guard, good, whole))

    def location(self, key: bytes) -> tuple[str, int, int, Guard] | None:
        """(file, offset, length, guard) of a leaf in a complete file, as recorded (the caller compares the
        guard with the file it opens); None for journals and unknown leaves. No disk access."""
        with self._lock:
            name = self._by_key.get(key)
            record = self._records.get(name) if name is not None else None
            if record is None or record.guard is None:
                return None
            offset, length = record.entries[key]
            return record.path, offset, length, record.guard

    def entries(self) -> Iterator[tuple[bytes, str, int, int]]:
        """(multihash, file, offset, length) of every recorded leaf whose file is there (for accounting and
        tests)."""
        with self._lock:
            self.refresh()
            records = list(self._records.values())
        for record in records:
            if not os.path.exists(record.path):
                continue
            for key, (offset, length) in record.entries.items():
                yield key, record.path, offset, length

    def sizes(self) -> dict[bytes, int]:
        """Bytes of each distinct recorded leaf."""
        return {key: length for key, _path, _offset, length in self.entries()}

    def holds(self, path: Path, root: str) -> bool:
        """Whether `path` is the recorded, unchanged, whole file of `root`."""
        with self._lock:
            self.refresh()
            record = self._records.get(record_name(path, INDEX))
            if record is None or record.root != root or record.guard is None or not record.whole:
                return False
        try:
            return Guard.of(os.stat(path)) == record.guard
        except FileNotFoundError:
            return False

    # --- writing ------------------------------------------------------------------------------------------
    def add_file(self, path: Path, root: str, entries: Iterable[tuple[bytes, int, int]]) -> None:
        """Record a complete file (already fsynced and in place) that holds these verified leaves."""
        guard = Guard.of(os.stat(path))
        record = FileRecord(record_name(path, INDEX), str(path), root, guard)
        for key, offset, length in entries:
            record.entries.setdefault(key, (offset, length))
        self._write_record(record)

    def open_journal(self, path: Path, root: str) -> Journal:
        """Start the journal of a file being written (its leaves become visible as they are appended)."""
        name = record_name(path, JOURNAL)
        header = serialise(FileRecord(name, str(path), root, None, whole=False))
        try:
            fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot start a filestore journal for {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while the file is written (see `_in_use`)
            os.write(fd, header)
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot start a filestore journal for {path}: {exc}") from exc
        with self._lock:
            self._records[name] = FileRecord(name, str(path), root, None)
            self._inodes[name] = os.fstat(fd).st_ino
        return Journal(self, name, fd)

    def _append(self, name: str, entries: list[tuple[bytes, int, int]]) -> None:
        with self._lock:
            record = self._records.get(name)
            if record is None:
                return
            for key, offset, length in entries:
                record.entries.setdefault(key, (offset, length))
                self._by_key.setdefault(key, name)

    def drop_partials(self, root: str) -> int:
        """Delete the journals of `root` and the temp files they describe (once its file is complete), except
        those of pulls still writing (another process may pull the same CID)."""
        with self._lock:
            self.refresh()
            partial = [r for r in self._records.values()
                       if r.partial and r.root == root and not self._in_use(r)]
            for record in partial:
                self._remove(record, delete_file=True)
            return len(partial)

    def _in_use(self, record: FileRecord) -> bool:
        """Whether a journal is still held open by a live writer (its flock; `kill -9` releases it)."""
        try:
            fd = os.open(self.dir / record.name, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also releases the probe's lock
        return False

    def remove_journal(self, name: str) -> None:
        """Forget a journal whose file was completed and recorded (or discarded) by its writer."""
        with self._lock:
            record = self._records.get(name)
            if record is not None:
                self._remove(record, delete_file=False)

    def retain(self, keep: set[bytes]) -> tuple[int, int]:
        """Garbage collection: drop entries whose leaf is not in `keep`; a record left empty (or without
        leaves, and its root not kept) goes with its file (filestore files are the IPFS layer's own outputs).
        Returns (leaves, bytes) dropped."""
        dropped_blocks = dropped_bytes = 0
        with self._lock:
            self.refresh()
            for record in list(self._records.values()):
                if not os.path.exists(record.path) and not self._in_use(record):
                    self._remove(record, delete_file=False)  # its file was deleted: nothing to free
                    continue
                gone = [k for k in record.entries if k not in keep]
                if not record.entries and _root_key(record.root) not in keep and not self._in_use(record):
                    self._remove(record, delete_file=True)  # a file of dag-pb leaves, no longer pinned
                    continue
                if not gone or (record.partial and self._in_use(record)):
                    continue
                dropped_blocks += len(gone)
                dropped_bytes += sum(record.entries[k][1] for k in gone)
                if len(gone) == len(record.entries):
                    self._remove(record, delete_file=True)
                else:
                    self._forget(record.name, gone)
        return dropped_blocks, dropped_bytes

    def _forget(self, name: str, keys: list[bytes]) -> None:
        with self._lock:
            record = self._records.get(name)
            if record is None:
                return
            kept = {k: v for k, v in record.entries.items() if k not in keys}
            self._write_record(FileRecord(record.name, record.path, record.root, record.guard, kept, False))

    def _remove(self, record: FileRecord, *, delete_file: bool) -> None:
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / record.name)
            if delete_file:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(record.path)
            self._records.pop(record.name, None)
            self._inodes.pop(record.name, None)
            self._rebuild_keys()

    def _write_record(self, record: FileRecord) -> None:
        """Write a record atomically (temp, fsync, rename) and make it the one in memory."""
        body = serialise(record)
        with self._lock:
            try:
                fd, tmp = tempfile.mkstemp(dir=self._tmp_dir, prefix="filestore-")
                try:
                    os.write(fd, body)
                    if self._fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.dir / record.name)
                inode = os.stat(self.dir / record.name).st_ino
            except OSError as exc:
                raise StoreError(f"cannot write filestore record for {record.path}: {exc}") from exc
            self._records[record.name] = record
            self._inodes[record.name] = inode
            self._rebuild_keys()


def _root_key(root: str) -> bytes | None:
    try:
        return bytes(parse_cid(root).digest)
    except InvalidCidError:
        return None


def _holds(fd: int, key: bytes, offset: int, length: int) -> bool:
    data = os.pread(fd, length, offset)
    return len(data) == length and hashes_to(key, data)


class Journal:
    """Appends the leaves of a file being written; `append` only after the bytes are verified and synced."""

    def __init__(self, files: FileStore, name: str, fd: int) -> None:
        self._files = files
        self.name = name
        self._fd: int | None = fd

    def append(self, entries: list[tuple[bytes, int, int]]) -> None:
        if not entries or self._fd is None:
            return
        try:
            os.write(self._fd, entry_lines(entries))
        except OSError as exc:
            raise StoreError(f"cannot append to filestore journal {self.name}: {exc}") from exc
        self._files._append(self.name, entries)

    def close(self) -> None:
        """Stop writing (releases the lock: the journal then serves a later resume)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Close and delete the journal (its file was completed and recorded, or is being discarded)."""
        self.close()
        self._files.remove_journal(self.name)
