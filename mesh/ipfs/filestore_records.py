"""The filestore's on-disk records (see `filestore.py`): a JSON header line (`path`, `root`, `whole`,
`guard`), then `<base32 multihash> <offset> <length>` per leaf. A torn last line (a crash while appending
to a journal) is ignored, as is any line that does not parse."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shoal.mesh.ipfs.cid import SHA2_256_PREFIX

INDEX = ".idx"
JOURNAL = ".journal"


@dataclass(frozen=True)
class Guard:
    """What a complete file looked like when its record was written; any write, `touch` or replacement
    changes at least one field (ctime cannot be set back by a user)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Guard:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class FileRecord:
    name: str
    """The record's own file name under the filestore directory."""
    path: str
    """The backing file."""
    root: str
    """The CID of the DAG whose file it is."""
    guard: Guard | None
    """None for a journal (a file still being written): its reads are always re-hashed."""
    entries: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    """Multihash → (offset, length) of a raw leaf inside the file."""
    whole: bool = True
    """Whether the file still holds every leaf it was recorded with (false once one was dropped)."""

    @property
    def partial(self) -> bool:
        return self.guard is None


def key_text(key: bytes) -> str:
    return base64.b32encode(key).decode("ascii").rstrip("=").lower()


def key_bytes(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


def hashes_to(key: bytes, data: bytes | memoryview) -> bool:
    """Whether `data` hashes to the sha2-256 multihash `key`."""
    return key[:2] == SHA2_256_PREFIX and hashlib.sha256(data).digest() == key[2:]


def record_name(path: str | Path, suffix: str) -> str:
    return hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:32] + suffix


def entry_lines(entries: Iterable[tuple[bytes, int, int]]) -> bytes:
    return "".join(f"{key_text(k)} {o} {n}\n" for k, o, n in entries).encode("ascii")


def parse(name: str, raw: bytes) -> FileRecord | None:
    """A record from its file's bytes, or None if the header is unreadable. Bad or torn lines are skipped."""
    header, _, body = raw.partition(b"\n")
    try:
        meta = json.loads(header)
        guard = Guard(*meta["guard"]) if meta.get("guard") is not None else None
        whole = meta.get("whole") is True
        record = FileRecord(name, str(meta["path"]), str(meta["root"]), guard, whole=whole)
    except (ValueError, KeyError, TypeError):
        return None
    lines = body.split(b"\n")
    for line in lines[:-1]:  # the last piece has no newline: empty, or torn by a crash
        try:
            text, offset, length = line.decode("ascii").split(" ")
            record.entries.setdefault(key_bytes(text), (int(offset), int(length)))
        except ValueError:
            continue
    return record


def serialise(record: FileRecord) -> bytes:
    header = {"path": record.path, "root": record.root, "whole": record.whole,
              "guard": None if record.guard is None else list(record.guard.__dict__.values())}
    lines = entry_lines((key, offset, length) for key, (offset, length) in record.entries.items())
    return json.dumps(header).encode() + b"\n" + lines
