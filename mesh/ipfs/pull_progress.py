"""What a pull reports: `FetchStats` (a fetcher's counters), `Progress` (one pull's progress, as handed to
the caller's callback) and `PullTally`, which counts a pull's blocks and bytes as they arrive."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from multiformats import CID
from shoal.mesh.ipfs.car import CarBlock, contiguous
from shoal.mesh.ipfs.cid import DAG_PB
from shoal.mesh.ipfs.reader import decoded_node

REPORT_EVERY_S = 0.25


@dataclass
class FetchStats:
    blocks_local: int = 0
    """Blocks found in the local store (not fetched)."""
    blocks_fetched: int = 0
    """Blocks fetched from a source, verified and stored."""
    bytes_fetched: int = 0
    bad_blocks: int = 0
    """Blocks rejected because they did not hash to their CID."""
    source_failures: int = 0
    """Requests that failed (errors, timeouts, truncated or undecodable responses), bad blocks included."""
    by_source: Counter = field(default_factory=Counter)
    """Verified blocks per source name."""


@dataclass(frozen=True)
class Progress:
    cid: str
    bytes_done: int
    bytes_total: int
    blocks_done: int
    rate_bps: float
    eta_s: float | None


ProgressCallback = Callable[[Progress], None]


class PullTally:
    """One pull's progress: file bytes and blocks done (each block counted once), the file's size once its
    root is seen, the bytes fetched (for the rate); `report()` hands a `Progress` to the callback."""

    def __init__(self, root: CID, progress: ProgressCallback | None) -> None:
        self.root = root
        self._progress = progress
        self._started = time.monotonic()
        self._last_report = 0.0
        self._counted: set[bytes] = set()
        self.done = 0
        self.blocks = 0
        self.total = 0
        self.fetched_bytes = 0

    def report(self) -> None:
        if self._progress is None:
            return
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self.fetched_bytes / elapsed
        left = self.total - self.done
        eta = left / rate if rate > 0 and left >= 0 else None
        self._progress(Progress(str(self.root), self.done, self.total, self.blocks, rate, eta))

    def report_soon(self) -> None:
        """Report unless the last report was under `REPORT_EVERY_S` ago."""
        if time.monotonic() - self._last_report > REPORT_EVERY_S:
            self._last_report = time.monotonic()
            self.report()

    def complete(self, size: int, blocks: int | None = None) -> None:
        """The whole file is local (`size` bytes, `blocks` blocks when known): report it."""
        self.done = self.total = size
        if blocks is not None:
            self.blocks = blocks
        self.report()

    def count(self, cid: CID, block: CarBlock, fetched: bool) -> list[CID]:
        """Count a verified block (once) and return its children; raises CodecError for a dag-pb node that
        is not part of a file."""
        children: list[CID] = []
        key = bytes(cid.digest)
        already = key in self._counted
        self._counted.add(key)
        if cid.codec.name == DAG_PB:
            node = decoded_node(cid, bytes(contiguous(block)))  # raises CodecError unless a file node
            children = [child for child, _ in node.children]
            if cid == self.root:
                self.total = node.size
            if not already:
                self.done += len(node.data)
        else:
            if cid == self.root:
                self.total = len(block)
            if not already:
                self.done += len(block)
        if not already:
            self.blocks += 1
            if fetched:
                self.fetched_bytes += len(block)
        return children
