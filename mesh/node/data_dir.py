"""One node per data dir: an exclusive `flock` on `<data dir>/node.lock`, held while the node runs.

Two nodes on one data dir would share one peer identity and write the same block store, pins and compile
cache. The lock file holds the owner's pid (for the message); the kernel drops the lock when the process
ends, even on `kill -9`, so a stale file never blocks a restart. `shoal pull`/`publish` do not take it: they
may share a running node's data dir (the store's own file locks cover what they write together).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "node.lock"


class DataDirInUseError(OSError):
    """Another live process holds the data dir's node lock."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise `DataDirInUseError` naming the holder's pid. Blocking (a few syscalls)."""
        if self._fd is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUseError(
                f"data dir {self.data_dir} is in use by node pid {holder}; stop that node or give this one "
                "another --data-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it could race a node taking it). Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)
