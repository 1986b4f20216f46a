"""Verified, parallel, resumable fetching of blocks and whole file DAGs from an ordered list of sources.

Every block is hashed against its CID before it is stored or used (the store refuses anything else). A source
that fails is backed off exponentially (capped); one that serves blocks failing verification is banned for a
while. A pull first asks the local store, so an interrupted pull resumes from the blocks it already has.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from multiformats import CID

from mesh.ipfs import dagpb, unixfs
from mesh.ipfs.assembler import StreamingAssembler
from mesh.ipfs.cid import DAG_PB
from mesh.ipfs.config import IpfsConfig
from mesh.ipfs.errors import (
    BlockNotFoundError,
    CodecError,
    SourceError,
    StoreError,
    VerificationError,
)
from mesh.ipfs.sources import BlockSource, CarSource
from mesh.ipfs.store import BlockStore

logger = logging.getLogger(__name__)
CAR_BATCH_BYTES = 1 << 20


@dataclass
class _Health:
    failures: int = 0
    retry_at: float = 0.0
    bad_blocks: int = 0


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


def leaf_bytes(cid: CID, block: bytes) -> int:
    """File bytes a block contributes itself (raw leaves: all; dag-pb: its UnixFS data)."""
    if cid.codec.name != DAG_PB:
        return len(block)
    node = dagpb.decode_node(block)
    if node.data is None:
        return 0
    data = unixfs.decode_data(node.data).data
    return len(data) if data else 0


class Fetcher:
    def __init__(self, store: BlockStore, sources: Sequence[BlockSource], config: IpfsConfig) -> None:
        self.store = store
        self.sources = list(sources)
        self.config = config
        self._health: dict[str, _Health] = {s.name: _Health() for s in self.sources}
        self.stats = FetchStats()
        self._fetched: set[bytes] = set()
        self.assembled = False
        """Whether the latest `fetch_dag` wrote the output file itself while streaming."""

    # --- one block ----------------------------------------------------------------------------------------
    def _penalise(self, source: BlockSource, bad_block: bool) -> None:
        health = self._health.setdefault(source.name, _Health())
        health.failures += 1
        self.stats.source_failures += 1
        if bad_block:
            health.bad_blocks += 1
            self.stats.bad_blocks += 1
        if health.bad_blocks >= self.config.ban_after_bad_blocks:
            health.retry_at = time.monotonic() + self.config.ban_s
            logger.warning("source %s banned for %.0f s (bad blocks)", source.name, self.config.ban_s)
            return
        delay = min(self.config.backoff_base_s * 2 ** (health.failures - 1), self.config.backoff_max_s)
        health.retry_at = time.monotonic() + delay

    def _reward(self, source: BlockSource) -> None:
        health = self._health.setdefault(source.name, _Health())
        health.failures = 0
        health.retry_at = 0.0

    async def _store(
        self, source_name: str, cid: CID, data: bytes, then: Callable[[], None] | None = None
    ) -> None:
        """Verify and store a block in a worker thread (raising VerificationError), then run `then` there."""

        def work() -> None:
            self.store.put(cid, data)
            if then is not None:
                then()

        await asyncio.to_thread(work)
        self.stats.blocks_fetched += 1
        self.stats.bytes_fetched += len(data)
        self.stats.by_source[source_name] += 1
        self._fetched.add(bytes(cid.digest))

    async def get_block(self, cid: CID) -> bytes:
        """The verified block, from the store or the first source that has it (storing it)."""
        data = await asyncio.to_thread(self.store.get, cid)
        if data is not None:
            if bytes(cid.digest) not in self._fetched:
                self.stats.blocks_local += 1
            return data
        errors: list[str] = []
        for attempt in range(self.config.retries):
            now = time.monotonic()
            ready = [s for s in self.sources if self._health[s.name].retry_at <= now]
            if not ready and self.sources:  # everyone is backing off: wait for the first to come back
                wait = min(self._health[s.name].retry_at for s in self.sources) - now
                await asyncio.sleep(min(max(wait, 0.0), self.config.backoff_max_s))
                ready = [s for s in self.sources if self._health[s.name].retry_at <= time.monotonic()]
            for source in ready:
                try:
                    data = await asyncio.wait_for(source.get_block(cid), self.config.block_timeout_s)
                    await self._store(source.name, cid, data)
                except VerificationError as exc:
                    logger.warning("rejected block %s from %s: %s", cid, source.name, exc)
                    self._penalise(source, bad_block=True)
                    errors.append(f"{source.name}: bad block")
                    continue
                except BlockNotFoundError as exc:
                    errors.append(str(exc))
                    continue
                except (SourceError, TimeoutError) as exc:
                    logger.info("source %s failed for %s: %r", source.name, cid, exc)
                    self._penalise(source, bad_block=False)
                    errors.append(str(exc) if str(exc) else f"{source.name}: timed out")
                    continue
                except StoreError:
                    raise  # our disk, not the source's fault
                except Exception as exc:  # a plugged-in source broke its contract: treat it as failed
                    logger.exception("source %s raised unexpectedly for %s", source.name, cid)
                    self._penalise(source, bad_block=False)
                    errors.append(f"{source.name}: {type(exc).__name__}: {exc}")
                    continue
                self._reward(source)
                return data
            if attempt + 1 < self.config.retries:
                await asyncio.sleep(min(self.config.backoff_base_s * 2**attempt, self.config.backoff_max_s))
        detail = "; ".join(dict.fromkeys(errors)) or "no sources configured"
        raise BlockNotFoundError(f"could not get block {cid} from any source ({detail})")

    def _scan_local(self, root: CID) -> tuple[int, set[bytes]] | None:
        """(file size, block keys) when the store holds the whole DAG under `root`, else None. Blocking; raw
        leaves are checked for presence only (they were verified when stored)."""
        keys: set[bytes] = set()
        size = 0
        stack = [root]
        while stack:
            cid = stack.pop()
            keys.add(bytes(cid.digest))
            if cid.codec.name != DAG_PB:
                if cid == root:
                    block = self.store.get(cid)
                    return None if block is None else (len(block), keys)
                if not self.store.has(cid):
                    return None
                continue
            block = self.store.get(cid)
            if block is None:
                return None
            node = dagpb.decode_node(block)
            info = unixfs.decode_data(node.data) if node.data is not None else None
            if info is None or info.type not in unixfs.FILE_TYPES:
                return None  # let the walk report what is wrong
            if cid == root:
                size = info.filesize or 0
            stack.extend(link.cid for link in node.links)
        return size, keys

    # --- a whole DAG --------------------------------------------------------------------------------------
    async def _store_batch(self, name: str, batch: list[tuple[CID, bytes, Callable[[], None] | None]],
                           slots: asyncio.Semaphore, on_block: Callable[[CID, bytes], None]) -> None:
        """Verify and store several blocks in one worker-thread hop (fewer hops: faster streams)."""

        def work() -> None:
            for cid, block, then in batch:
                self.store.put(cid, block)  # verifies; raises VerificationError
                if then is not None:
                    then()

        try:
            await asyncio.to_thread(work)
        finally:
            slots.release()
        for cid, block, _ in batch:
            self.stats.blocks_fetched += 1
            self.stats.bytes_fetched += len(block)
            self.stats.by_source[name] += 1
            self._fetched.add(bytes(cid.digest))
            on_block(cid, block)

    async def _try_car(self, root: CID, on_block: Callable[[CID, bytes], None],
                       assembler: StreamingAssembler | None = None) -> None:
        """Stream the DAG as a CAR from the first source that offers it, hashing and writing blocks in
        parallel threads (in batches of about 1 MiB) while the stream goes on. Any failure just ends the
        attempt: the block walk that follows fills whatever is missing from the other sources."""
        for source in self.sources:
            if not isinstance(source, CarSource) or self._health[source.name].retry_at > time.monotonic():
                continue
            slots = asyncio.Semaphore(self.config.parallelism)
            try:
                async with asyncio.TaskGroup() as group:
                    batch: list[tuple[CID, bytes, Callable[[], None] | None]] = []
                    batch_bytes = 0
                    async for cid, block in source.stream_car(root):
                        then = None
                        if assembler is not None:
                            offsets, data = assembler.plan(cid, block)
                            if offsets and data:
                                then = functools.partial(assembler.write, offsets, data)
                        batch.append((cid, block, then))
                        batch_bytes += len(block)
                        if batch_bytes >= CAR_BATCH_BYTES:
                            await slots.acquire()
                            group.create_task(self._store_batch(source.name, batch, slots, on_block))
                            batch, batch_bytes = [], 0
                    if batch:
                        await slots.acquire()
                        group.create_task(self._store_batch(source.name, batch, slots, on_block))
                self._reward(source)
            except* VerificationError as eg:
                logger.warning("rejected CAR from %s: %s", source.name, eg.exceptions[0])
                self._penalise(source, bad_block=True)
            except* (SourceError, CodecError, TimeoutError) as eg:
                logger.info("CAR from %s failed for %s: %r", source.name, root, eg.exceptions[0])
                self._penalise(source, bad_block=False)
            except* StoreError as eg:
                raise eg.exceptions[0] from None  # our disk, not the source's fault
            except* Exception as eg:  # a plugged-in source broke its contract: treat it as failed
                logger.error("CAR from %s raised unexpectedly for %s: %r", source.name, root, eg.exceptions)
                self._penalise(source, bad_block=False)
            return

    async def fetch_dag(
        self, root: CID, progress: ProgressCallback | None = None, assemble_to: Path | None = None
    ) -> int:
        """Make every block of the file DAG under `root` local; return the file size. With `assemble_to`,
        a fresh pull streamed as a CAR also writes the file there as it arrives (`self.assembled` tells
        whether that worked; if not, the caller assembles it from the store)."""
        self.assembled = False
        started = time.monotonic()
        state = {"done": 0, "blocks": 0, "total": 0, "fetched_bytes": 0}
        seen: set[bytes] = set()
        last_report = 0.0

        def report() -> None:
            if progress is None:
                return
            elapsed = max(time.monotonic() - started, 1e-6)
            rate = state["fetched_bytes"] / elapsed
            left = state["total"] - state["done"]
            eta = left / rate if rate > 0 and left >= 0 else None
            progress(Progress(str(root), state["done"], state["total"], state["blocks"], rate, eta))

        counted: set[bytes] = set()

        def count(cid: CID, block: bytes, fetched: bool) -> list[CID]:
            children: list[CID] = []
            key = bytes(cid.digest)
            already = key in counted
            counted.add(key)
            if cid.codec.name == DAG_PB:
                node = dagpb.decode_node(block)
                children = [link.cid for link in node.links]
                if node.data is None:
                    raise CodecError(f"{cid} is a dag-pb node without UnixFS data")
                info = unixfs.decode_data(node.data)
                if info.type not in unixfs.FILE_TYPES:
                    raise CodecError(f"{cid} is not a UnixFS file (type {info.type})")
                if cid == root:
                    state["total"] = info.filesize or 0
                if not already:
                    state["done"] += len(info.data or b"")
            else:
                if cid == root:
                    state["total"] = len(block)
                if not already:
                    state["done"] += len(block)
            if not already:
                state["blocks"] += 1
                if fetched:
                    state["fetched_bytes"] += len(block)
            return children

        if not await asyncio.to_thread(self.store.has, root):
            def on_car_block(cid: CID, block: bytes) -> None:
                nonlocal last_report
                try:
                    count(cid, block, True)
                except CodecError:
                    return  # not a file node: the walk reports it
                if time.monotonic() - last_report > 0.25:
                    last_report = time.monotonic()
                    report()

            assembler = StreamingAssembler(root, assemble_to) if assemble_to is not None else None
            try:
                await self._try_car(root, on_car_block, assembler)
            except BaseException:
                if assembler is not None:
                    await asyncio.to_thread(assembler.abort)
                raise
            if assembler is not None:
                # Complete means every link of every (verified) node arrived, verified, and was written:
                # the whole DAG is stored, so no scan is needed.
                self.assembled = await asyncio.to_thread(assembler.finish)
                if self.assembled and assembler.size is not None:
                    state["done"] = state["total"] = assembler.size
                    report()
                    return assembler.size
        present = await asyncio.to_thread(self._scan_local, root)
        if present is not None:  # complete already: no walk needed
            size, keys = present
            self.stats.blocks_local += len(keys - self._fetched)
            state["total"] = state["done"] = size
            state["blocks"] = len(keys)
            report()
            return size

        queue: asyncio.Queue[CID] = asyncio.Queue()
        queue.put_nowait(root)
        seen.add(bytes(root.digest))

        async def worker() -> None:
            nonlocal last_report
            while True:
                cid = await queue.get()
                try:
                    before = self.stats.blocks_fetched
                    block = await self.get_block(cid)
                    for child in count(cid, block, self.stats.blocks_fetched > before):
                        key = bytes(child.digest)
                        if key not in seen:
                            seen.add(key)
                            queue.put_nowait(child)
                    if time.monotonic() - last_report > 0.25:
                        last_report = time.monotonic()
                        report()
                finally:
                    queue.task_done()

        try:
            async with asyncio.TaskGroup() as group:
                workers = [group.create_task(worker()) for _ in range(self.config.parallelism)]
                await queue.join()
                for task in workers:
                    task.cancel()
        except* Exception as eg:  # the first failure, as itself (IpfsError, OSError), not as a group
            raise eg.exceptions[0] from None
        report()
        return state["total"]
