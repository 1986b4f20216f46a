"""Verified, parallel, resumable fetching of blocks and whole file DAGs from an ordered list of sources.

Every block is hashed against its CID before it is stored or used (the store refuses anything else). A source
that fails is backed off exponentially (capped); one that serves blocks failing verification is banned for a
while (`ipfs.source_health`). A pull first asks the local store, so an interrupted pull resumes from the
blocks it already has; its progress is counted by `ipfs.pull_progress`.

Every wait is bounded and every pool ends: one block waits at most `block_timeout_s` per source (through
`asyncio.timeout`, which never loses a cancellation as Python 3.11's `wait_for` can), a whole-DAG pull that
gets no new block for `stall_timeout_s` fails with `PullStalledError`, and the block-walk workers stop on a
sentinel when the walk ends, fails or is cancelled (they never rely on a cancellation reaching them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from multiformats import CID
from shoal.mesh.ipfs import dagpb, unixfs
from shoal.mesh.ipfs.assembler import StreamingAssembler
from shoal.mesh.ipfs.car import CarBlock, block_parts, contiguous
from shoal.mesh.ipfs.cid import DAG_PB, verify_pieces
from shoal.mesh.ipfs.config import IpfsConfig
from shoal.mesh.ipfs.errors import (
    BlockNotFoundError,
    CodecError,
    PullStalledError,
    SourceError,
    StoreError,
    VerificationError,
)
from shoal.mesh.ipfs.pull_progress import FetchStats, Progress, ProgressCallback, PullTally
from shoal.mesh.ipfs.source_health import SourceHealth
from shoal.mesh.ipfs.sources import BlockSource, CarSource
from shoal.mesh.ipfs.store import BlockStore

__all__ = ["FetchStats", "Fetcher", "Progress", "ProgressCallback"]
logger = logging.getLogger(__name__)
CAR_BATCH_BYTES = 4 << 20

_Streamed = tuple[CID, CarBlock, list[int], CarBlock]
"""A block from a CAR stream: (cid, bytes, offsets in the assembled file, the file bytes it holds)."""


class Fetcher:
    def __init__(self, store: BlockStore, sources: Sequence[BlockSource], config: IpfsConfig) -> None:
        self.store = store
        self.sources = list(sources)
        self.config = config
        self.health = SourceHealth(self.sources, config)
        self.stats = FetchStats()
        self._fetched: set[bytes] = set()
        self.assembled = False
        """Whether the latest `fetch_dag` wrote the output file itself while streaming."""
        self._stall: asyncio.Timeout | None = None
        """The running `fetch_dag`'s no-progress deadline, pushed back by every block obtained."""
        self._stall_kicked = 0.0

    def _progressed(self) -> None:
        """A block arrived (or was found): push the stall deadline back (at most every 0.1 s)."""
        if self._stall is None:
            return
        now = time.monotonic()
        if now - self._stall_kicked >= 0.1:
            self._stall_kicked = now
            self._stall.reschedule(asyncio.get_running_loop().time() + self.config.stall_timeout_s)

    # --- one block ----------------------------------------------------------------------------------------
    def _penalise(self, source: BlockSource, bad_block: bool) -> None:
        self.stats.source_failures += 1
        if bad_block:
            self.stats.bad_blocks += 1
        self.health.penalise(source, bad_block)

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
        self._progressed()

    async def get_block(self, cid: CID) -> bytes:
        """The verified block, from the store or the first source that has it (storing it)."""
        data = await asyncio.to_thread(self.store.get, cid)
        if data is not None:
            if bytes(cid.digest) not in self._fetched:
                self.stats.blocks_local += 1
            self._progressed()
            return data
        errors: list[str] = []
        for attempt in range(self.config.retries):
            ready = self.health.ready(self.sources)
            if not ready and self.sources:  # everyone is backing off: wait for the first to come back
                wait = min(self.health.retry_at(s) for s in self.sources) - time.monotonic()
                await asyncio.sleep(min(max(wait, 0.0), self.config.backoff_max_s))
                ready = self.health.ready(self.sources)
            for source in ready:
                try:
                    async with asyncio.timeout(self.config.block_timeout_s):
                        data = await source.get_block(cid)
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
                self.health.reward(source)
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
    def _keep(self, cid: CID, block: CarBlock, offsets: list[int], data: CarBlock,
              assembler: StreamingAssembler | None) -> None:
        """Verify a streamed block and keep it (worker thread; raises VerificationError): a raw leaf the
        assembled file takes goes only there (the file holds it for the store); anything else is stored."""
        if (assembler is not None and offsets and assembler.holds_leaves() and cid.codec.name != DAG_PB
                and cid != assembler.root):
            verify_pieces(cid, block_parts(block))
            assembler.write(offsets, data, leaf=bytes(cid.digest))
            return
        self.store.put(cid, bytes(contiguous(block)))  # verifies
        if assembler is not None and offsets and len(data):
            assembler.write(offsets, data)

    async def _store_batch(self, name: str, batch: list[_Streamed], slots: asyncio.Semaphore,
                           on_block: Callable[[CID, CarBlock], None],
                           assembler: StreamingAssembler | None) -> None:
        """Verify and keep several blocks in one worker-thread hop (fewer hops: faster streams)."""

        def work() -> None:
            for cid, block, offsets, data in batch:
                self._keep(cid, block, offsets, data, assembler)

        try:
            await asyncio.to_thread(work)
        finally:
            slots.release()
        for cid, block, _, _ in batch:
            self.stats.blocks_fetched += 1
            self.stats.bytes_fetched += len(block)
            self.stats.by_source[name] += 1
            self._fetched.add(bytes(cid.digest))
            on_block(cid, block)
        self._progressed()

    async def _try_car(self, root: CID, on_block: Callable[[CID, CarBlock], None],
                       assembler: StreamingAssembler | None = None) -> None:
        """Stream the DAG as a CAR from the first source that offers it, hashing and writing blocks in
        parallel threads (in batches of about 4 MiB) while the stream goes on. Any failure just ends the
        attempt: the block walk that follows fills whatever is missing from the other sources."""
        for source in self.sources:
            if not isinstance(source, CarSource) or self.health.retry_at(source) > time.monotonic():
                continue
            try:
                await self._ingest(source.name, source.stream_car(root), on_block, assembler)
                self.health.reward(source)
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

    async def _ingest(
        self, name: str, blocks: AsyncIterator[tuple[CID, CarBlock]],
        on_block: Callable[[CID, CarBlock], None], assembler: StreamingAssembler | None,
    ) -> None:
        """Plan each streamed block on the loop (its place in the file), then verify and keep the blocks in
        worker-thread batches, as many at once as there are cores (hashing is CPU: more threads only
        contend, with the network loop too)."""
        slots = asyncio.Semaphore(max(1, min(self.config.parallelism, os.cpu_count() or 1)))
        store = functools.partial(self._store_batch, name, slots=slots, on_block=on_block,
                                  assembler=assembler)
        async with asyncio.TaskGroup() as group:
            batch: list[_Streamed] = []
            batch_bytes = 0
            async for cid, block in blocks:
                offsets, data = assembler.plan(cid, block) if assembler is not None else ([], b"")
                batch.append((cid, block, offsets, data))
                batch_bytes += len(block)
                if batch_bytes >= CAR_BATCH_BYTES:
                    await slots.acquire()
                    group.create_task(store(batch))
                    batch, batch_bytes = [], 0
            if batch:
                await slots.acquire()
                group.create_task(store(batch))

    async def fetch_dag(
        self, root: CID, progress: ProgressCallback | None = None, assemble_to: Path | None = None
    ) -> int:
        """Make every block of the file DAG under `root` local; return the file size. With `assemble_to`,
        a fresh pull streamed as a CAR also writes the file there as it arrives (`self.assembled` tells
        whether that worked; if not, the caller assembles it from the store). Raises `PullStalledError` when
        no block arrives for `stall_timeout_s`."""
        stall_s = self.config.stall_timeout_s
        try:
            async with asyncio.timeout(stall_s) as deadline:
                self._stall, self._stall_kicked = deadline, time.monotonic()
                return await self._fetch_dag(root, progress, assemble_to)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise PullStalledError(f"pull of {root} stalled: no block arrived for {stall_s:g} s "
                                   f"({self.stats.blocks_fetched} fetched, {self.stats.source_failures} "
                                   "failed requests)") from None
        finally:
            self._stall = None

    async def _fetch_dag(self, root: CID, progress: ProgressCallback | None, assemble_to: Path | None) -> int:
        self.assembled = False
        tally = PullTally(root, progress)
        seen: set[bytes] = set()

        if not await asyncio.to_thread(self.store.has, root):
            def on_car_block(cid: CID, block: CarBlock) -> None:
                try:
                    tally.count(cid, block, True)
                except CodecError:
                    return  # not a file node: the walk reports it
                tally.report_soon()

            assembler = None
            if assemble_to is not None:
                assembler = await asyncio.to_thread(
                    StreamingAssembler, root, assemble_to, self.store.files, fsync=self.store.fsync)
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
                    tally.complete(assembler.size)
                    return assembler.size
        present = await asyncio.to_thread(self._scan_local, root)
        if present is not None:  # complete already: no walk needed
            size, keys = present
            self.stats.blocks_local += len(keys - self._fetched)
            tally.complete(size, len(keys))
            return size

        queue: asyncio.Queue[CID | None] = asyncio.Queue()
        queue.put_nowait(root)
        seen.add(bytes(root.digest))
        workers = self.config.parallelism
        closed = False

        def close_pool() -> None:
            """End the walk: every worker, idle or about to be, meets a sentinel (None) and returns."""
            nonlocal closed
            if not closed:
                closed = True
                for _ in range(workers):
                    queue.put_nowait(None)

        async def worker() -> None:
            while not closed:
                cid = await queue.get()
                if cid is None:
                    return
                try:
                    before = self.stats.blocks_fetched
                    block = await self.get_block(cid)
                    for child in tally.count(cid, block, self.stats.blocks_fetched > before):
                        key = bytes(child.digest)
                        if key not in seen:
                            seen.add(key)
                            queue.put_nowait(child)
                    tally.report_soon()
                except BaseException:
                    close_pool()  # a worker whose cancellation was lost elsewhere still stops
                    raise
                finally:
                    queue.task_done()

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())
                try:
                    await queue.join()
                finally:
                    close_pool()
        except* Exception as eg:  # the first failure, as itself (IpfsError, OSError), not as a group
            raise eg.exceptions[0] from None
        tally.report()
        return tally.total
