"""Pull benchmark: the default model (SmolLM2-135M Q4_1, 94 MiB) pulled with full verification

  (a) from a local IPFS node (js-ipfs, offline on loopback) over RPC, against that node's own `cat` time;
  (b) from another shoal node's trustless gateway (a separate process), against a plain aiohttp download of
      the same file from the same server.

Targets: (a) >= 0.8x, (b) >= 0.5x of the baseline's throughput. Prints a table.

    python3 bench/pull.py [--runs 3] [--skip-jsipfs]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aiohttp import web  # noqa: E402
from shoal.mesh.ipfs.config import IpfsConfig  # noqa: E402
from shoal.mesh.ipfs.service import IpfsService  # noqa: E402
from shoal.models.embedded import embedded_model_path  # noqa: E402

from tests.mesh.ipfs.jsipfs import free_port, start_jsipfs  # noqa: E402

MIB = 1024 * 1024


async def serve(data_dir: Path, port: int, file: Path | None) -> None:
    """Serve mode: a shoal node's gateway over a store holding the default model (or `file`), plus the same
    file as a plain static download at /plain/model.gguf."""
    service = IpfsService(IpfsConfig(rpc_url=None), data_dir)
    await service.start()
    model = file or embedded_model_path()
    cid = await service.publish(model) if file else await service.ensure_embedded()
    app = web.Application()
    service.add_routes(app)

    async def plain(_request: web.Request) -> web.StreamResponse:
        return web.FileResponse(model)

    app.router.add_get("/plain/model.gguf", plain)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(json.dumps({"cid": str(cid)}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await service.stop()


async def download(url: str, dest: Path, method: str = "GET", params: dict | None = None) -> int:
    """Plain download to a file (written and fsynced, as a pull writes its result)."""
    size = 0
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.request(method, url, params=params) as response:
            response.raise_for_status()
            with dest.open("wb") as out:
                async for chunk in response.content.iter_chunked(1 << 20):
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
    return size


def file_digest(path: Path) -> bytes:
    """sha2-256 of a file, read in 1 MiB pieces (no whole-file buffers between timed runs)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MIB):
            digest.update(chunk)
    return digest.digest()


async def timed_pull(config: IpfsConfig, cid: str, expected: bytes) -> float:
    """Seconds for one pull into a fresh data dir; `expected` is the sha2-256 of the file."""
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
        async with IpfsService(config, Path(tmp)) as service:
            start = time.perf_counter()
            path = await service.pull(cid)
            elapsed = time.perf_counter() - start
        if await asyncio.to_thread(file_digest, path) != expected:
            raise SystemExit("pulled bytes differ from the model file")
    return elapsed


async def timed_download(url: str, method: str = "GET", params: dict | None = None) -> float:
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
        start = time.perf_counter()
        await download(url, Path(tmp) / "model.gguf", method, params)
        return time.perf_counter() - start


async def jsipfs_add(rpc_url: str, path: Path) -> str:
    params = {"cid-version": "1", "raw-leaves": "true"}
    async with aiohttp.ClientSession() as session:
        with path.open("rb") as body:
            form = aiohttp.FormData()
            form.add_field("file", body, filename=path.name)
            async with session.post(f"{rpc_url}/api/v0/add", params=params, data=form) as response:
                response.raise_for_status()
                return json.loads((await response.text()).strip().splitlines()[-1])["Hash"]


def row(name: str, base: list[float], ours: list[float], size: int, target: float) -> str:
    b, o = statistics.median(base), statistics.median(ours)
    ratio = b / o
    verdict = "ok" if ratio >= target else "BELOW TARGET"
    base_text = f"{size / MIB / b:8.1f} MiB/s ({b:5.2f} s)"
    ours_text = f"{size / MIB / o:8.1f} MiB/s ({o:5.2f} s)"
    return f"| {name:38} | {base_text:26} | {ours_text:26} | {ratio:5.2f}x | >= {target}x {verdict} |"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-jsipfs", action="store_true", help="only case (b)")
    parser.add_argument("--size-mib", type=int, default=0,
                        help="use N MiB of deterministic random data instead of the default model")
    parser.add_argument("--serve", nargs=3, metavar=("DATA_DIR", "PORT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        await serve(Path(args.serve[0]), int(args.serve[1]), Path(args.serve[2]) if args.serve[2] else None)
        return
    (REPO / ".cache").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=REPO / ".cache", prefix="bench-pull-"))
    file_arg = ""
    if args.size_mib:
        model = work / "data.bin"
        model.write_bytes(random.Random(0).randbytes(args.size_mib * MIB))
        file_arg = str(model)
    else:
        model = embedded_model_path()
    expected = file_digest(model)
    size = model.stat().st_size
    start = time.perf_counter()
    file_digest(model)  # in the page cache now: the verification floor
    hash_s = time.perf_counter() - start
    rows = []
    try:
        if not args.skip_jsipfs:
            node = await asyncio.to_thread(start_jsipfs, work / "jsipfs")
            try:
                cid = await jsipfs_add(node.rpc_url, model)
                cat, ours = [], []
                config = IpfsConfig(rpc_url=node.rpc_url, gateways=())
                for _ in range(args.runs):
                    cat.append(await timed_download(f"{node.rpc_url}/api/v0/cat", "POST", {"arg": cid}))
                    ours.append(await timed_pull(config, cid, expected))
                rows.append(row("(a) js-ipfs RPC: cat vs shoal pull", cat, ours, size, 0.8))
            finally:
                node.stop()
        port = free_port()
        server = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", str(work / "gateway"), str(port), file_arg,
            stdout=asyncio.subprocess.PIPE, cwd=REPO,
        )
        try:
            line = await server.stdout.readline()  # type: ignore[union-attr]
            cid = json.loads(line)["cid"]
            url = f"http://127.0.0.1:{port}"
            plain, ours = [], []
            config = IpfsConfig(rpc_url=None, gateways=(url,))
            for _ in range(args.runs):
                plain.append(await timed_download(f"{url}/plain/model.gguf"))
                ours.append(await timed_pull(config, cid, expected))
            rows.append(row("(b) shoal gateway: plain GET vs pull", plain, ours, size, 0.5))
        finally:
            server.terminate()
            await asyncio.wait_for(server.wait(), 10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    what = f"random data ({args.size_mib} MiB)" if args.size_mib else "default model"
    print(f"{what}: {size / MIB:.1f} MiB, median of {args.runs} runs, loopback, fsync on; "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"verification floor: sha2-256 of the file alone takes {hash_s:.2f} s "
          f"({size / MIB / hash_s:.0f} MiB/s) on one core")
    print(f"| {'case':38} | {'baseline':26} | {'shoal (verified)':26} | ratio | target |")
    print(f"|{'-' * 40}|{'-' * 28}|{'-' * 28}|-------|--------|")
    for line in rows:
        print(line)


if __name__ == "__main__":
    asyncio.run(main())
