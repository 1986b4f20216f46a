"""The service's HTTP API (`POST /v1/models/pull` with progress on the event bus, `POST /v1/models/publish`,
`GET /v1/ipfs/models`) and the importer's flat memory."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path

from shoal.mesh.events import EventBus
from shoal.mesh.ipfs.importer import ImportOptions, import_file
from shoal.mesh.ipfs.service import IpfsService

from tests.mesh.ipfs.conftest import offline_config, start_gateway

MIB = 1024 * 1024


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


async def test_pull_endpoint_reports_progress_events(write_data, tmp_path: Path, http) -> None:
    source = write_data(6 * MIB, seed=11)
    async with IpfsService(offline_config(publish_dirs=(str(source.parent),)), tmp_path / "a") as node_a:
        runner_a, url_a = await start_gateway(node_a)
        body = {"path": str(source), "name": "six-mib"}  # a path inside [ipfs] publish_dirs
        async with http.post(f"{url_a}/v1/models/publish", json=body) as r:
            assert r.status == 200, await r.text()
            cid = (await r.json())["cid"]
        bus = EventBus()
        subscription = bus.subscribe()
        config = offline_config(gateways=(url_a,), parallelism=2)
        async with IpfsService(config, tmp_path / "b", bus) as node_b:
            runner_b, url_b = await start_gateway(node_b)
            try:
                async with http.post(f"{url_b}/v1/models/pull", json={"model": cid}) as r:
                    assert r.status == 202
                    pull_id = (await r.json())["pull_id"]
                events = []
                async with asyncio.timeout(60):
                    async for event in subscription:
                        events.append(event)
                        if event.kind in ("pull.done", "pull.failed"):
                            break
                async with http.get(f"{url_b}/v1/ipfs/models") as r:
                    listed = (await r.json())["models"]
                async with http.post(f"{url_b}/v1/models/pull", json={"model": "no-such-model"}) as r:
                    assert r.status == 404
                    assert "neither a known model name" in await r.text()
                async with http.post(f"{url_b}/v1/models/pull", data=b"not json") as r:
                    assert r.status == 400
            finally:
                await runner_b.cleanup()
                await runner_a.cleanup()
    assert events[-1].kind == "pull.done", events[-1]
    assert all(e.data["pull_id"] == pull_id for e in events if e.kind.startswith("pull."))
    progress = [e.data for e in events if e.kind == "pull.progress"]
    assert progress and progress[-1]["bytes_done"] == progress[-1]["bytes_total"] == 6 * MIB
    assert {"model", "cid", "blocks_done", "rate_bps", "eta_s"} <= set(progress[-1])
    assert same_bytes(Path(events[-1].data["path"]), source)
    assert any(m["cid"] == cid and m["complete"] for m in listed)


def test_import_memory_stays_flat(tmp_path: Path) -> None:
    """Importing 48 MiB holds at most a few chunks plus one row of links per level, not the file."""
    path = tmp_path / "big.bin"
    with path.open("wb") as out:
        for i in range(48):
            out.write(bytes([i]) * MIB)
    tracemalloc.start()
    try:
        result = import_file(path, options=ImportOptions(cid_version=1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.size == 48 * MIB
    assert peak < 4 * MIB, peak


async def test_stop_cancels_running_pulls(write_data, tmp_path: Path) -> None:
    from aiohttp import web

    from tests.mesh.ipfs.faults import FaultyGateway

    source = write_data(2 * MIB, seed=13)
    async with IpfsService(offline_config(), tmp_path / "a") as node_a:
        cid = await node_a.publish(source)
    gateway = FaultyGateway(node_a.store, "slow", delay_s=0.5, car=False)
    runner = web.AppRunner(gateway.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    bus = EventBus()
    try:
        service = IpfsService(offline_config(gateways=(url,), parallelism=1), tmp_path / "b", bus)
        await service.start()
        pull_id = service.start_pull(str(cid))
        deadline = time.monotonic() + 30
        while not gateway.requests:  # the pull is under way: a block request waits at the slow gateway
            assert time.monotonic() < deadline, "the pull never reached the gateway"
            await asyncio.sleep(0.01)
        await service.stop()
        await service.stop()  # idempotent
    finally:
        await runner.cleanup()
    failed = [e.data for e in bus.recent("pull.failed")]
    assert failed == [{"pull_id": pull_id, "model": str(cid), "error": "cancelled"}]
    assert not (tmp_path / "b" / "models" / f"{cid}.gguf").exists()
