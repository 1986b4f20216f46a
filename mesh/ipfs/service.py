"""`IpfsService`: the node's IPFS layer. Owns the block store, catalog, HTTP session and block sources;
pulls (whole or one layer span), publishes, lists models, imports the embedded default, and adds the trustless
gateway and model routes to the node's aiohttp app.

Data dir layout: `ipfs/blocks/…`, `ipfs/filestore/…`, `ipfs/pins.json`, `ipfs/catalog.json`,
`models/<cid>.gguf` (assembled files; they also hold the model's raw leaves for the store, see
`filestore.py`), `models/<cid>.layers-<a>-<b>.gguf` (sparse files holding the header and one span's
tensors), and `models/<cid>.header.gguf` (the header alone: tokenizer and shape of a model this node only
routes or splits).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from multiformats import CID
from shoal.mesh.ipfs.assembler import PublishedFileWriter, SparseFileWriter
from shoal.mesh.ipfs.car_producer import Buffer, CarProducer, produce
from shoal.mesh.ipfs.catalog import EMBEDDED_NAME, Catalog
from shoal.mesh.ipfs.cid import parse_cid
from shoal.mesh.ipfs.config import IpfsConfig
from shoal.mesh.ipfs.errors import InvalidCidError, IpfsError, SourceError, UnknownModelError
from shoal.mesh.ipfs.fetcher import Fetcher, FetchStats, Progress
from shoal.mesh.ipfs.importer import ImportOptions, import_file
from shoal.mesh.ipfs.reader import UnixFSReader, assemble_file
from shoal.mesh.ipfs.sources import BlockSource, GatewaySource, KuboRpcSource
from shoal.mesh.ipfs.store import STALE_TEMP_S, BlockStore, StoreStats

if TYPE_CHECKING:
    from aiohttp import web
    from shoal.mesh.events import EventBus
    from shoal.models.span import LayerSpan

logger = logging.getLogger(__name__)
SPAN_READ_BYTES = 4 << 20


@dataclass(frozen=True)
class PullResult:
    cid: CID
    path: Path
    size: int
    stats: FetchStats = field(compare=False)


class IpfsService:
    def __init__(self, config: IpfsConfig, data_dir: str | Path, events: EventBus | None = None) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        self.events = events
        self.store = BlockStore(self.data_dir / "ipfs", fsync=config.fsync)
        self.catalog = Catalog(self.data_dir / "ipfs" / "catalog.json")
        self.models_dir = self.data_dir / "models"
        self._session: aiohttp.ClientSession | None = None
        self._extra_sources: list[tuple[str, BlockSource]] = []
        self._mesh_names: Callable[[str], str | None] | None = None
        self._pulls: dict[str, asyncio.Task[PullResult]] = {}
        self._ids = itertools.count(1)
        self._closing = False
        self.last_span_stats: FetchStats | None = None
        """Fetch statistics of the latest `pull_span` (blocks fetched and found locally)."""

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._clean_stale_temps)
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=max(16, self.config.parallelism * 2))
            timeout = aiohttp.ClientTimeout(sock_connect=self.config.connect_timeout_s)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        self._closing = False

    def _clean_stale_temps(self) -> None:
        """Remove half-written model files an interrupted (even `kill -9`ed) pull left behind, and the
        folders of uploads a killed node was receiving (`POST /v1/models/publish`, see `upload.py`)."""
        now = time.time()
        for folder in self.data_dir.glob("uploads/upload-*"):
            try:
                if now - folder.stat().st_mtime > STALE_TEMP_S:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                continue
        if not self.models_dir.is_dir():
            return
        for path in self.models_dir.glob(".*.gguf.*"):
            try:
                if now - path.stat().st_mtime > STALE_TEMP_S:
                    path.unlink()
            except OSError:
                continue

    async def stop(self) -> None:
        """Refuse new pulls, cancel running ones, close the HTTP session. Safe to call twice."""
        self._closing = True
        tasks = list(self._pulls.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                if (current := asyncio.current_task()) is not None and current.cancelling():
                    raise
            except Exception:  # already reported as pull.failed by the task itself
                pass
        self._pulls.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> IpfsService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def add_routes(self, app: web.Application) -> None:
        from shoal.mesh.ipfs.routes import add_routes

        add_routes(app, self)

    # --- sources ------------------------------------------------------------------------------------------
    def add_source(self, source: BlockSource, kind: str = "mesh") -> None:
        """Plug in another block source (e.g. the WebRTC mesh), placed by `kind` in the policy order."""
        self._extra_sources.append((kind, source))

    def set_mesh_names(self, lookup: Callable[[str], str | None]) -> None:
        """Where names this node's catalog lacks are looked up: the mesh's catalogs (the CID most members
        give the name, from their adverts). Without it, names resolve in this node's catalog only."""
        self._mesh_names = lookup

    def resolve(self, name_or_cid: str) -> CID:
        """A CID from this node's catalog, a CID string, or the mesh's catalogs; `UnknownModelError` (saying
        where it looked) or `InvalidCidError` otherwise."""
        try:
            return self.catalog.resolve(name_or_cid)
        except UnknownModelError as exc:
            found = self._mesh_names(name_or_cid.strip()) if self._mesh_names is not None else None
            if found is None:
                where = "this node's catalog and the mesh's" if self._mesh_names else "this node's catalog"
                raise UnknownModelError(f"{exc} (looked in {where})") from None
            return parse_cid(found)

    def sources(self) -> list[BlockSource]:
        session = self._require_session()
        ordered: list[BlockSource] = []
        for kind in self.config.source_order:
            if kind == "rpc" and self.config.rpc_url:
                ordered.append(KuboRpcSource(self.config.rpc_url, session, self.config.block_timeout_s))
            elif kind == "gateway":
                timeout = self.config.block_timeout_s
                ordered.extend(GatewaySource(u, session, timeout) for u in self.config.gateways)
            ordered.extend(source for k, source in self._extra_sources if k == kind)
        return ordered

    def fetcher(self, sources: Sequence[BlockSource] | None = None) -> Fetcher:
        return Fetcher(self.store, self.sources() if sources is None else sources, self.config)

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._closing:
            raise IpfsError("the IPFS service is not running (call start() first)")
        return self._session

    # --- pull ---------------------------------------------------------------------------------------------
    def model_path(self, cid: CID) -> Path:
        return self.models_dir / f"{cid}.gguf"

    async def pull_detailed(
        self,
        name_or_cid: str,
        progress: Callable[[Progress], None] | None = None,
        pull_id: str | None = None,
        sources: Sequence[BlockSource] | None = None,
    ) -> PullResult:
        """Fetch (verified, resumable) the whole model, assemble it under `models/`, pin it."""
        self._require_session()
        pull_id = pull_id or f"pull-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        model = name_or_cid
        try:
            cid = self.resolve(name_or_cid)
            name = "" if _is_cid_text(name_or_cid) else name_or_cid.strip()

            def on_progress(p: Progress) -> None:
                if self.events is not None:
                    self.events.publish(
                        "pull.progress", pull_id=pull_id, model=model, cid=p.cid, bytes_done=p.bytes_done,
                        bytes_total=p.bytes_total, blocks_done=p.blocks_done, rate_bps=p.rate_bps,
                        eta_s=p.eta_s,
                    )
                if progress is not None:
                    progress(p)

            fetcher = self.fetcher(sources)
            existing = (await asyncio.to_thread(self.store.pins)).get(str(cid))
            if existing is None or not existing.complete:
                await asyncio.to_thread(self.store.pin, cid, name=name, complete=False)
            path = self.model_path(cid)
            size = await fetcher.fetch_dag(cid, on_progress, assemble_to=path)
            if not fetcher.assembled and (fetcher.stats.blocks_fetched or not await asyncio.to_thread(
                    self.store.files.holds, path, str(cid))):
                await asyncio.to_thread(assemble_file, self.store, cid, path, keep_leaves=True)
            await asyncio.to_thread(self.store.pin, cid, name=name, size=size, complete=True)
            if name:
                await asyncio.to_thread(self.catalog.add, name, cid)
        except asyncio.CancelledError:
            if self.events is not None:
                self.events.publish("pull.failed", pull_id=pull_id, model=model, error="cancelled")
            raise
        except (IpfsError, OSError, ValueError) as exc:
            if self.events is not None:
                self.events.publish("pull.failed", pull_id=pull_id, model=model, error=str(exc))
            raise
        stats = fetcher.stats
        if self.events is not None:
            self.events.publish(
                "pull.done", pull_id=pull_id, model=model, cid=str(cid), path=str(path), bytes_total=size,
                blocks_fetched=stats.blocks_fetched, blocks_local=stats.blocks_local,
            )
        return PullResult(cid=cid, path=path, size=size, stats=stats)

    async def pull(self, name_or_cid: str, progress: Callable[[Progress], None] | None = None) -> Path:
        return (await self.pull_detailed(name_or_cid, progress)).path

    def start_pull(self, name_or_cid: str) -> str:
        """Start a pull in the background (owned by the service); return its id for the event stream."""
        self._require_session()
        self.resolve(name_or_cid)  # fail fast on bad names
        pull_id = f"pull-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        task = asyncio.get_running_loop().create_task(self.pull_detailed(name_or_cid, pull_id=pull_id))
        self._pulls[pull_id] = task
        task.add_done_callback(lambda t: self._pull_finished(pull_id, t))
        return pull_id

    def _pull_finished(self, pull_id: str, task: asyncio.Task[PullResult]) -> None:
        self._pulls.pop(pull_id, None)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("pull %s failed: %s", pull_id, task.exception())

    async def pull_span(self, name_or_cid: str, span: LayerSpan | None) -> Path:
        """Fetch only the GGUF header and the tensors of layers `span` (None: the header alone), into a
        sparse local file that `GGUFModel.open` can map. Only the UnixFS blocks covering those byte ranges are
        fetched; a `span.fetched` event and `last_span_stats` say how many bytes that was."""
        from shoal.models.gguf import read_gguf_index
        from shoal.models.validate import check_model

        self._require_session()
        cid = self.resolve(name_or_cid)
        started = time.perf_counter()
        fetcher = self.fetcher()
        reader = UnixFSReader(fetcher.get_block)
        size = await reader.size(cid)
        loop = asyncio.get_running_loop()

        def read(offset: int, length: int) -> bytes:
            return asyncio.run_coroutine_threadsafe(reader.read(cid, offset, length), loop).result()

        index = await asyncio.to_thread(read_gguf_index, read)
        await asyncio.to_thread(check_model, index, source=str(cid), file_size=size)  # refuse a crafted file
        ranges = [(0, index.data_start)]
        if span is not None:
            ranges += index.byte_ranges_for_span(span)
        await asyncio.to_thread(self.store.pin, cid, name="", size=size, complete=False)
        part = "header" if span is None else f"layers-{span.start}-{span.stop}"
        dest = self.models_dir / f"{cid}.{part}.gguf"
        writer = await asyncio.to_thread(SparseFileWriter, dest, size)
        try:
            for start, end in ranges:  # a few MiB at a time: memory stays flat for any span
                for offset in range(start, end, SPAN_READ_BYTES):
                    data = await reader.read(cid, offset, min(SPAN_READ_BYTES, end - offset))
                    await asyncio.to_thread(writer.write_at, offset, data)
            await asyncio.to_thread(writer.commit)
        except BaseException:
            writer.discard()
            raise
        stats = self.last_span_stats = fetcher.stats
        wanted = sum(end - start for start, end in ranges)
        seconds = time.perf_counter() - started
        logger.info("fetched %s of %s: %d bytes wanted of a %d-byte file, %d bytes in %d blocks fetched "
                    "(%s), %d blocks local, %.1f s", part, cid, wanted, size, stats.bytes_fetched,
                    stats.blocks_fetched, dict(stats.by_source), stats.blocks_local, seconds)
        if self.events is not None:
            self.events.publish("span.fetched", cid=str(cid), span=None if span is None else str(span),
                                file_bytes=size, span_bytes=wanted, bytes_fetched=stats.bytes_fetched,
                                blocks_fetched=stats.blocks_fetched, blocks_local=stats.blocks_local,
                                by_source=dict(stats.by_source), seconds=round(seconds, 3))
        return dest

    # --- publish ------------------------------------------------------------------------------------------
    async def publish(
        self, path: str | Path, name: str | None = None, *, cid_version: int = 1, to_ipfs: bool = False
    ) -> CID:
        """Import a file into the store (Kubo-identical DAG), pin it, name it; optionally push it to the
        local IPFS node over RPC (`dag/import`). With raw leaves the file is copied once, to
        `models/<cid>.gguf`, which then holds the leaves for the store (no block files for them)."""
        path = Path(path)
        if not path.is_file():
            raise IpfsError(f"{path} is not a file")

        options = ImportOptions(cid_version=cid_version)
        writer = await asyncio.to_thread(PublishedFileWriter, self.store, self.models_dir)
        try:
            result = await asyncio.to_thread(import_file, path, writer.sink, options)
        except BaseException:
            await asyncio.to_thread(writer.discard)
            raise
        await asyncio.to_thread(writer.commit, result.root, result.size, self.model_path(result.root))
        await asyncio.to_thread(self.store.pin, result.root, name=name or path.name, size=result.size)
        if name:
            await asyncio.to_thread(self.catalog.add, name, result.root)
        if to_ipfs:
            await self.push_to_rpc(result.root)
        return result.root

    async def push_to_rpc(self, root: CID) -> None:
        if not self.config.rpc_url:
            raise SourceError("no IPFS RPC URL is configured to push to")
        rpc = KuboRpcSource(self.config.rpc_url, self._require_session(), self.config.block_timeout_s)
        await rpc.import_car(self.car_stream(root))

    async def car_stream(self, root: CID, *, scope: str = "all") -> AsyncIterator[Buffer]:
        """CARv1 bytes of the DAG under `root` from the local store (`scope`: "all" or "block"), depth-first
        (file order): leaf runs already in the page cache read on the event loop ~1 MiB at a time, the rest
        in a worker thread ~4 MiB at a time (see `car_producer.py`). Parts are views of two reused buffers;
        one is overwritten only once nothing holds a view of it any more."""
        async for part in produce(CarProducer(self.store, root, scope=scope, reuse_buffers=True)):
            yield part

    # --- listing and the embedded default -----------------------------------------------------------------
    def list_models(self) -> list[dict[str, Any]]:
        entries = self.catalog.entries()
        pins = self.store.pins()
        out: list[dict[str, Any]] = []
        for cid, pin in pins.items():
            names = sorted(n for n, c in entries.items() if c == cid)
            path = self.models_dir / f"{cid}.gguf"
            out.append({
                "cid": cid, "names": names or ([pin.name] if pin.name else []), "size": pin.size,
                "pinned": True, "complete": pin.complete, "path": str(path) if path.is_file() else None,
            })
        for name, cid in entries.items():
            if cid not in pins:
                out.append({"cid": cid, "names": [name], "size": None, "pinned": False, "complete": False,
                            "path": None})
        return out

    async def unpin(self, name_or_cid: str) -> bool:
        cid = self.catalog.resolve(name_or_cid)
        return await asyncio.to_thread(self.store.unpin, cid)

    async def gc(self) -> StoreStats:
        """Delete blocks no pin reaches (a running pull's blocks are pinned, so they stay)."""
        return await asyncio.to_thread(self.store.gc)

    async def ensure_embedded(self) -> CID:
        """Import the embedded default model into the store (pinned, named) unless it is already there."""
        from shoal.models.embedded import embedded_model_path

        path = await asyncio.to_thread(embedded_model_path)
        entries = self.catalog.entries()
        pins = self.store.pins()
        known = entries.get(EMBEDDED_NAME)
        if known and known in pins and pins[known].complete and self.store.has(CID.decode(known)):
            return CID.decode(known)
        return await self.publish(path, EMBEDDED_NAME)


def _is_cid_text(text: str) -> bool:
    """Whether a pull names its model by CID (then no catalog name is recorded for it)."""
    try:
        parse_cid(text.strip().removeprefix("/ipfs/"))
    except InvalidCidError:
        return False
    return True

