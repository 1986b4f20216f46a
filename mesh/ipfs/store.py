"""On-disk block store under the data dir.

Layout: `blocks/<xx>/<key>` (key = base32 multihash, `xx` = its next-to-last two characters, as Kubo's
flatfs), `filestore/` (raw leaves kept inside assembled model files, see `filestore.py`), `tmp/` for writes
in flight, `pins.json`. A block is verified against its CID before it is written; it is written to a temp
file, fsynced and renamed into place, so a crash never leaves a partial block under a valid name. All methods
block: async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from multiformats import CID
from shoal.mesh.ipfs import dagpb
from shoal.mesh.ipfs.cid import DAG_PB, block_key, parse_cid, verify_block
from shoal.mesh.ipfs.errors import CodecError, StoreError
from shoal.mesh.ipfs.filestore import FileStore, key_bytes, key_text

logger = logging.getLogger(__name__)
STALE_TEMP_S = 3600.0


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock shared with other processes (the node and a `shoal pull` may share a data
    dir): read-modify-write of small JSON files happens under it."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _writer_gone(name: str, own_prefix: str) -> bool:
    """Whether a `blk-<pid>-<nonce>-<n>` temp file's writer has ended (other names: unknown, False)."""
    parts = name.split("-")
    if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return not name.startswith(own_prefix)  # an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


@dataclass(frozen=True)
class Pin:
    cid: str
    name: str
    """A friendly name or the file name it was published from; may be empty."""
    size: int
    """File bytes of the pinned DAG."""
    complete: bool
    """False while a pull is under way, or for a partial (layer-span) pull."""
    time: float


@dataclass(frozen=True)
class StoreStats:
    blocks: int
    bytes: int


class BlockStore:
    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self._blocks = self.root / "blocks"
        self._tmp = self.root / "tmp"
        self._pins_path = self.root / "pins.json"
        self._pins_lock = self.root / "pins.lock"
        self._fsync = fsync
        self._lock = threading.Lock()
        self._stats: StoreStats | None = None
        self._blocks_dir = str(self._blocks)
        self._tmp_dir = str(self._tmp)
        self._shards: set[str] = set()
        self._temp_ids = itertools.count()  # next() on a count is atomic under the GIL
        self._temp_prefix = f"blk-{os.getpid()}-{os.urandom(4).hex()}-"
        try:
            self._blocks.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the block store at {self.root}: {exc}") from exc
        self._clean_stale_temps()
        self.files = FileStore(self.root / "filestore", self._tmp, fsync=fsync)
        """Raw leaves that live inside assembled files rather than block files."""

    # --- blocks -------------------------------------------------------------------------------------------
    def path_of(self, cid: CID) -> Path:
        key = block_key(cid)
        return self._blocks / key[-3:-1] / key

    def has(self, cid: CID) -> bool:
        return self.path_of(cid).is_file() or self.files.has(bytes(cid.digest))

    def get(self, cid: CID) -> bytes | None:
        """The block's bytes (a block file, else a filestore leaf), or None when it is not stored."""
        try:
            return self.path_of(cid).read_bytes()
        except FileNotFoundError:
            return self.files.get(bytes(cid.digest))
        except OSError as exc:
            raise StoreError(f"cannot read block {cid}: {exc}") from exc

    def put(self, cid: CID, data: bytes) -> bool:
        """Verify and store a block; return False if it was already there. Raises `VerificationError`.
        Plain `os` calls on purpose: this runs for every block of every pull, often in parallel threads."""
        verify_block(cid, data)
        key = block_key(cid)
        shard = key[-3:-1]
        path = os.path.join(self._blocks_dir, shard, key)
        if os.path.exists(path):
            return False
        tmp = os.path.join(self._tmp_dir, f"{self._temp_prefix}{next(self._temp_ids)}")
        try:
            if shard not in self._shards:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self._shards.add(shard)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise StoreError(f"cannot write block {cid}: {exc}") from exc
            raise
        with self._lock:
            if self._stats is not None:
                self._stats = StoreStats(self._stats.blocks + 1, self._stats.bytes + len(data))
        return True

    def delete(self, cid: CID) -> int:
        """Remove a block; return the bytes freed."""
        path = self.path_of(cid)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        with self._lock:
            if self._stats is not None:
                self._stats = StoreStats(self._stats.blocks - 1, self._stats.bytes - size)
        return size

    def forget_block_files(self, keys: Iterable[bytes]) -> int:
        """Delete the block files of blocks a filestore file now holds (recorded first); return how many."""
        removed = 0
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._key_path(key))
                removed += 1
        if removed:
            with self._lock:
                self._stats = None
        return removed

    @property
    def fsync(self) -> bool:
        """Whether writes are fsynced (off only for throwaway stores)."""
        return self._fsync

    def keys(self) -> Iterator[Path]:
        for shard in self._blocks.iterdir():
            if shard.is_dir():
                yield from (p for p in shard.iterdir() if p.is_file())

    def block_keys(self) -> set[str]:
        """Keys (base32 multihashes) of every stored block: block files and filestore leaves."""
        keys = {path.name for path in self.keys()}
        keys.update(key_text(key) for key in self.files.sizes())
        return keys

    def stats(self) -> StoreStats:
        """Distinct blocks and their bytes, block files and filestore leaves together."""
        files = self._file_stats()
        extra = [n for k, n in self.files.sizes().items() if not os.path.exists(self._key_path(k))]
        return StoreStats(files.blocks + len(extra), files.bytes + sum(extra))

    def _key_path(self, key: bytes) -> str:
        text = key_text(key)
        return os.path.join(self._blocks_dir, text[-3:-1], text)

    def _file_stats(self) -> StoreStats:
        with self._lock:
            if self._stats is not None:
                return self._stats
        blocks = 0
        size = 0
        for path in self.keys():
            blocks += 1
            size += path.stat().st_size
        with self._lock:
            self._stats = StoreStats(blocks, size)
            return self._stats

    def _clean_stale_temps(self) -> None:
        """Remove temp files a dead writer left (`kill -9` mid-write): a block temp whose writer's pid is not
        running any more (or is this process, under another prefix) at once, any other after an hour."""
        now = time.time()
        for path in self._tmp.iterdir():
            try:
                if _writer_gone(path.name, self._temp_prefix) or now - path.stat().st_mtime > STALE_TEMP_S:
                    path.unlink()
            except OSError:
                continue

    # --- pins ---------------------------------------------------------------------------------------------
    def pins(self) -> dict[str, Pin]:
        with self._lock:
            return self._read_pins()

    def _read_pins(self) -> dict[str, Pin]:
        try:
            raw = json.loads(self._pins_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {self._pins_path}: {exc}") from exc
        return {cid: Pin(**entry) for cid, entry in raw.items()}

    def _write_pins(self, pins: dict[str, Pin]) -> None:
        body = json.dumps({cid: pin.__dict__ for cid, pin in sorted(pins.items())}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="pins-")
        with os.fdopen(fd, "w") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._pins_path)

    def pin(self, cid: CID, *, name: str = "", size: int = 0, complete: bool = True) -> Pin:
        key = str(cid)
        with self._lock, file_lock(self._pins_lock):
            pins = self._read_pins()
            pin = Pin(cid=key, name=name, size=size, complete=complete, time=time.time())
            pins[key] = pin
            self._write_pins(pins)
        return pin

    def unpin(self, cid: CID) -> bool:
        with self._lock, file_lock(self._pins_lock):
            pins = self._read_pins()
            removed = pins.pop(str(cid), None) is not None
            if removed:
                self._write_pins(pins)
        return removed

    # --- reachability and garbage collection --------------------------------------------------------------
    def reachable(self, roots: Iterable[CID]) -> set[str]:
        """Keys of stored blocks reachable from `roots` (walking only blocks that are present; raw leaves
        are only checked for presence, not read)."""
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            cid = stack.pop()
            key = block_key(cid)
            if key in seen:
                continue
            if cid.codec.name != DAG_PB:
                if self.has(cid):
                    seen.add(key)
                continue
            data = self.get(cid)
            if data is None:
                continue
            seen.add(key)
            try:
                stack.extend(link.cid for link in dagpb.decode_node(data).links)
            except CodecError:
                logger.warning("stored block %s does not decode as dag-pb", cid)
        return seen

    def gc(self) -> StoreStats:
        """Delete every block not reachable from a pin (block files, and filestore leaves with the files
        left holding none); return what was freed. A pinned model's file is always kept."""
        keep = self.reachable(parse_cid(cid) for cid in self.pins())
        freed_blocks = 0
        freed_bytes = 0
        for path in list(self.keys()):
            if path.name in keep:
                continue
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            freed_blocks += 1
            freed_bytes += size
        leaves, leaf_bytes = self.files.retain({key_bytes(k) for k in keep})
        with self._lock:
            self._stats = None
        logger.info("gc freed %d blocks, %d bytes (%d filestore leaves)", freed_blocks + leaves,
                    freed_bytes + leaf_bytes, leaves)
        return StoreStats(freed_blocks + leaves, freed_bytes + leaf_bytes)
