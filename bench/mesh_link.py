"""Mesh link benchmark: separate node processes on loopback (the mesh harness), measured from a client node.

    python bench/mesh_link.py [--blocks 32] [--block-size 262144] [--rtt-count 200] [--repeat 3]
                              [--stream-mib 64] [--car-only] [--nat-only | --no-nat]

Reports: link setup time; RTT of 1 KiB and 8 KiB frames (median, p99) on `control` and `tensors`; block
throughput over one data channel (1 request in flight, then 8), from three peers at once over data channels,
through one peer's HTTP gateway, a CAR stream of `--stream-mib` MiB from a peer's gateway vs plain TCP of the
same size between two processes on loopback; RSS of client and server. Every throughput (the naive aiortc
baseline, `bench/naive_aiortc.py`, included) is measured `--repeat` times and reported as the median, with
the issue-6 ratios at the end. The server processes are started with `--bench`, which adds the routes below
to the harness. `--car-only` runs just the CAR stream (received by `http_stream`, as the product does, and
through aiohttp) and plain TCP, taking turns for `--repeat` rounds, and prints medians and per-round ratios.
Then the across-NAT rows (bench/mesh_nat.py: a link hole-punched through two cone NATs and one relayed
through TURN, each against a host link in the same topology; root, iptables and coturn, else a printed
reason); `--nat-only` runs just those, `--no-nat` leaves them out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shoal.mesh.p2p import protocol as p  # noqa: E402

if TYPE_CHECKING:
    from shoal.mesh.ipfs.block_exchange import BlockExchange
    from shoal.mesh.p2p.peer import Peer
    from shoal.mesh.p2p.service import MeshService

    from tests.mesh.mesh_nodes import Node

p.register_control_type("bench.echo", 16_384)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_routes(app: web.Application, mesh: MeshService, blocks: BlockExchange) -> None:
    """Routes added to a harness node started with `--bench` (both sides of every measurement)."""
    from shoal.mesh.ipfs.cid import parse_cid

    async def echo(peer: Peer, frame: p.ControlFrame) -> dict:
        return frame.body

    async def echo_tensor(peer: Peer, frame: p.BinaryFrame) -> p.BinaryFrame:
        return frame

    mesh.on_control("bench.echo", echo)
    mesh.on_binary(p.TENSOR, echo_tensor)

    async def rtt(request: web.Request) -> web.Response:
        peer = mesh.peer(request.query["peer"])
        size, count = int(request.query["size"]), int(request.query.get("count", "200"))
        channel = request.query["channel"]
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            if channel == "control":
                await peer.request("bench.echo", {"pad": "x" * (size - 40)})
            else:
                await peer.request_binary(p.TENSOR, {"dtype": "u8", "shape": [size]}, os.urandom(size))
            samples.append((time.perf_counter() - start) * 1000)
        return _json({"median_ms": statistics.median(samples), "p99_ms": _percentile(samples, 0.99)})

    async def pull(request: web.Request) -> web.Response:
        body = await request.json()
        cids = [parse_cid(c) for c in body["cids"]]
        source = blocks.source(prefer_http=body["via"] == "http", only=set(body["peers"]), attempts=1)
        queue: asyncio.Queue = asyncio.Queue()
        for cid in cids:
            queue.put_nowait(cid)
        total = 0

        async def worker() -> None:
            nonlocal total
            while not queue.empty():
                data = await source.get_block(queue.get_nowait())
                total += len(data)

        start = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(int(body["concurrency"])):
                group.create_task(worker())
        seconds = time.perf_counter() - start
        return _json(
            {
                "bytes": total,
                "seconds": seconds,
                "mib_s": total / seconds / 2**20,
                "stats": dict(source.stats),
            }
        )

    async def car(request: web.Request) -> web.Response:
        """Stream a DAG as a CAR from a peer's gateway, counting bytes (nothing stored or verified);
        `reader=aiohttp` receives it through aiohttp instead of `http_stream`; `peer=ID` picks the peer."""
        only = {request.query["peer"]} if "peer" in request.query else None
        source = blocks.source(direct_car=request.query.get("reader") != "aiohttp", only=only)
        total, start = 0, time.perf_counter()
        async for _cid, block in source.stream_car(parse_cid(request.query["cid"])):
            total += len(block)
        seconds = time.perf_counter() - start
        return _json({"bytes": total, "seconds": seconds, "mib_s": total / seconds / 2**20})

    async def rss(request: web.Request) -> web.Response:
        import psutil

        info = psutil.Process().memory_info()
        return _json({"rss": info.rss})

    app.router.add_get("/bench/rtt", rtt)
    app.router.add_post("/bench/pull", pull)
    app.router.add_get("/bench/car", car)
    app.router.add_get("/bench/rss", rss)


# ----- driver ---------------------------------------------------------------------------------------------

TCP_SERVER = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); chunk = b"x" * 262144; n = int(sys.argv[1])
for _ in range(n): c.sendall(chunk)
c.close()
"""


def tcp_baseline(total: int) -> float:
    import socket

    chunks = max(1, total // 262144)
    server = subprocess.Popen(
        [sys.executable, "-c", TCP_SERVER, str(chunks)], stdout=subprocess.PIPE, text=True
    )
    port = int(server.stdout.readline())
    start = time.perf_counter()
    received = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        while data := sock.recv(1 << 20):
            received += len(data)
    seconds = time.perf_counter() - start
    server.wait(10)
    return received / seconds / 2**20


def naive_aiortc_baseline(mib: int) -> float:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "naive_aiortc.py"), str(mib)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def car_only(args: argparse.Namespace, base: Path, server: Node, client: Node) -> int:
    """`--car-only`: a CAR stream from the server's gateway (received by `http_stream`, as the product does,
    and through aiohttp) and plain TCP, alternating, --repeat rounds; medians and per-round ratios."""
    client.post(f"/test/connect?address={server.api}", b"")
    time.sleep(1.0)
    stream = base / "stream.bin"
    stream.write_bytes(os.urandom(args.stream_mib << 20))
    root = server.post("/test/publish", {"path": str(stream)})["cid"]
    runs: dict[str, list[float]] = {"car": [], "car_aiohttp": [], "tcp": []}
    for _ in range(max(1, args.repeat)):
        runs["car"].append(client.get(f"/bench/car?cid={root}", timeout=600)["mib_s"])
        runs["car_aiohttp"].append(client.get(f"/bench/car?cid={root}&reader=aiohttp", timeout=600)["mib_s"])
        runs["tcp"].append(tcp_baseline(args.stream_mib << 20))
    ratios = {key: [v / t for v, t in zip(runs[key], runs["tcp"], strict=True)]
              for key in ("car", "car_aiohttp")}
    if args.json:
        print(json.dumps({"runs_mib_s": runs, "ratios": ratios}, indent=1))
        return 0
    for key, label in [("car", "CAR stream from a peer gateway"),
                       ("car_aiohttp", "  the same through aiohttp"),
                       ("tcp", "plain TCP on loopback (2 processes)")]:
        values = " ".join(f"{v:.0f}" for v in runs[key])
        print(f"{label:40} {statistics.median(runs[key]):>18.1f} MiB/s  ({values})")
    for key, label in [("car", "CAR stream / plain TCP"), ("car_aiohttp", "  through aiohttp / plain TCP")]:
        values = " ".join(f"{100 * r:.0f}" for r in ratios[key])
        print(f"{label:40} {100 * statistics.median(ratios[key]):>19.0f} %   ({values})")
    return 0


def main() -> int:
    from shoal.mesh.p2p.invite import Invite

    from tests.mesh.mesh_nodes import Node, free_port

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=262_144)
    parser.add_argument("--rtt-count", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="runs per throughput; the median is reported")
    parser.add_argument("--stream-mib", type=int, default=64, help="size of the CAR stream and TCP runs")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--car-only", action="store_true",
                        help="only the CAR stream vs plain TCP, alternating, --repeat pairs (one server)")
    parser.add_argument("--nat-only", action="store_true", help="only the across-NAT rows (mesh_nat.py)")
    parser.add_argument("--no-nat", action="store_true", help="leave out the across-NAT rows")
    args = parser.parse_args()
    if args.nat_only:
        return nat_rows(args, None)

    token = Invite.create("bench").to_token()
    common = [
        "--invite",
        token,
        "--ice",
        "lo",
        "--no-mdns",
        "--bench",
        "--retry-max",
        "600",
        "--gossip",
        "30",
    ]
    base = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    servers = [Node(f"s{i}", base / f"s{i}", f"127.0.0.1:{free_port()}", common)
               for i in range(1 if args.car_only else 3)]
    client = Node("client", base / "client", f"127.0.0.1:{free_port()}", common)
    results: dict[str, object] = {}
    try:
        for node in [*servers, client]:
            node.start()
        if args.car_only:
            return car_only(args, base, servers[0], client)
        setups = [
            client.post(f"/test/connect?address={servers[0].api}&close=1", b"")["seconds"] for _ in range(5)
        ]
        results["setup_ms_median"] = statistics.median(setups) * 1000
        for server in servers:
            client.post(f"/test/connect?address={server.api}", b"")
        time.sleep(1.0)
        s0 = servers[0].peer_id
        for channel in ("control", "tensors"):
            for size in (1024, 8192):
                results[f"rtt_{channel}_{size // 1024}k"] = client.get(
                    f"/bench/rtt?peer={s0}&channel={channel}&size={size}&count={args.rtt_count}", timeout=120
                )
        cids = []
        for _ in range(args.blocks):
            data = os.urandom(args.block_size)
            cids = [*cids, servers[0].post("/test/blocks", data)["cid"]]
            for server in servers[1:]:
                server.post("/test/blocks", data)
        total = args.blocks * args.block_size

        def pull(via: str, peers: list[str], concurrency: int) -> dict:
            body = {"cids": cids, "via": via, "peers": peers, "concurrency": concurrency}
            return client.post("/bench/pull", body, timeout=600)

        def median_of(measure: Callable[[], dict]) -> dict:
            runs = [measure() for _ in range(max(1, args.repeat))]
            best = sorted(runs, key=lambda run: run["mib_s"])[len(runs) // 2]
            return {**best, "runs_mib_s": [round(run["mib_s"], 1) for run in runs]}

        every = [s.peer_id for s in servers]
        results["blocks_channel_1peer_1inflight"] = median_of(lambda: pull("channel", [s0], 1))
        results["blocks_channel_1peer_8inflight"] = median_of(lambda: pull("channel", [s0], 8))
        results["blocks_channel_3peers_12inflight"] = median_of(lambda: pull("channel", every, 12))
        results["blocks_http_1peer_8inflight"] = median_of(lambda: pull("http", [s0], 8))
        stream = base / "stream.bin"  # the gateway-vs-TCP comparison moves the same number of bytes
        stream.write_bytes(os.urandom(args.stream_mib << 20))
        stream_root = servers[0].post("/test/publish", {"path": str(stream)})["cid"]
        car_url = f"/bench/car?cid={stream_root}"
        results["car_stream_only"] = median_of(lambda: client.get(car_url, timeout=600))
        for via in ("car", "channel"):  # a file DAG held by all three servers, pulled by the IPFS fetcher
            path = base / f"file-{via}.bin"
            path.write_bytes(os.urandom(total))
            roots = {server.post("/test/publish", {"path": str(path)})["cid"] for server in servers}
            root = roots.pop()
            pulled = client.post("/test/mesh-pull", {"cid": root, "via": via}, timeout=600)
            pulled["mib_s"] = pulled["size"] / pulled["seconds"] / 2**20
            results[f"dag_{via}"] = pulled
        tcp = median_of(lambda: {"mib_s": tcp_baseline(args.stream_mib << 20)})
        results["tcp_loopback_mib_s"], results["tcp_runs_mib_s"] = tcp["mib_s"], tcp["runs_mib_s"]
        naive = median_of(lambda: {"mib_s": naive_aiortc_baseline(max(8, total >> 20))})
        results["naive_aiortc_mib_s"], results["naive_runs_mib_s"] = naive["mib_s"], naive["runs_mib_s"]
        results["rss_client_mib"] = client.get("/bench/rss")["rss"] / 2**20
        results["rss_server_mib"] = servers[0].get("/bench/rss")["rss"] / 2**20
    finally:
        for node in [client, *servers]:
            node.kill(15)
        shutil.rmtree(base, ignore_errors=True)  # published files and node data: hundreds of MB a run
    if args.json:
        return nat_rows(args, results)
    print(f"{'measurement':40} {'value':>24}")
    print(f"{'link setup (median of 5)':40} {results['setup_ms_median']:>21.1f} ms")
    for channel in ("control", "tensors"):
        for size in (1, 8):
            r = results[f"rtt_{channel}_{size}k"]
            label = f"RTT {size} KiB on {channel} (median / p99)"
            print(f"{label:40} {r['median_ms']:>9.2f} / {r['p99_ms']:>7.2f} ms")
    def runs(values: list[float]) -> str:
        return "  (" + " ".join(f"{v:.0f}" for v in values) + ")"

    for key, label in [
        ("blocks_channel_1peer_1inflight", "blocks: 1 data channel, 1 in flight"),
        ("blocks_channel_1peer_8inflight", "blocks: 1 data channel, 8 in flight"),
        ("blocks_channel_3peers_12inflight", "blocks: 3 peers' data channels, 12 in flight"),
        ("blocks_http_1peer_8inflight", "blocks: 1 peer's HTTP gateway, 8 in flight"),
        ("car_stream_only", "CAR stream from a peer gateway (no store)"),
        ("dag_car", "file DAG: CAR stream from a peer gateway"),
        ("dag_channel", "file DAG: fetcher over 3 peers' channels"),
    ]:
        extra = runs(results[key]["runs_mib_s"]) if "runs_mib_s" in results[key] else ""
        print(f"{label:40} {results[key]['mib_s']:>18.1f} MiB/s{extra}")
    naive, tcp = results["naive_aiortc_mib_s"], results["tcp_loopback_mib_s"]
    naive_runs, tcp_runs = runs(results["naive_runs_mib_s"]), runs(results["tcp_runs_mib_s"])
    print(f"{'one naive aiortc link (2 processes)':40} {naive:>18.1f} MiB/s{naive_runs}")
    print(f"{'plain TCP on loopback (2 processes)':40} {tcp:>18.1f} MiB/s{tcp_runs}")
    rss = f"{results['rss_client_mib']:>9.0f} / {results['rss_server_mib']:>7.0f} MiB"
    print(f"{'RSS client / server after the run':40} {rss}")
    three = results["blocks_channel_3peers_12inflight"]["mib_s"]
    car = results["car_stream_only"]["mib_s"]
    print(f"{'3 peers / one naive aiortc link':40} {three / naive:>19.1f} x   (target >= 2)")
    print(f"{'CAR stream / plain TCP':40} {100 * car / tcp:>19.0f} %   (target >= 50)")
    return nat_rows(args, None)


def nat_rows(args: argparse.Namespace, results: dict[str, object] | None) -> int:
    """Measure and print the across-NAT rows (not with --no-nat); with --json, as `nat` of one object with
    `results`."""
    from bench.mesh_nat import print_rows, rows

    nat = "left out (--no-nat)" if args.no_nat else rows(args)
    if args.json:
        print(json.dumps({**(results or {}), "nat": nat}, indent=1))
    else:
        print_rows(nat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
