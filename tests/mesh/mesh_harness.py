"""A small node process for mesh tests and benchmarks: an aiohttp app with the mesh service and the IPFS
block store + gateway, plus test-only routes. `shoal node` is the real thing; this runs the mesh alone.

    python -m tests.mesh.mesh_harness --data-dir D --api 127.0.0.1:0 [--invite T] [--bootstrap H:P ...]
        [--ice lo] [--no-mdns] [--delay-ms N]

Prints one JSON line `{"ready": true, "id": ..., "api": "host:port"}` on stdout once listening.
Test-only routes (`/test/...`): put a block, fetch a block through the mesh source, send raw frames to a
peer (to inject protocol faults).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

import orjson
from aiohttp import web
from shoal.mesh.events import EventBus
from shoal.mesh.ipfs.block_exchange import BlockExchange
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.errors import MeshError
from shoal.mesh.p2p.ice import delay_outgoing_datagrams
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.p2p.service import MeshService


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def test_routes(app: web.Application, mesh: MeshService, blocks: BlockExchange, ipfs: object) -> None:
    from shoal.mesh.ipfs.cid import RAW, make_cid, parse_cid

    source = blocks.source()
    channel_source = blocks.source(prefer_http=False, name="mesh channel")

    async def put_block(request: web.Request) -> web.Response:
        data = await request.read()
        cid = make_cid(data, RAW, 1)
        await asyncio.to_thread(ipfs.store.put, cid, data)  # type: ignore[attr-defined]
        roots = [*mesh.gossip.fields.get("roots", []), str(cid)][-256:]
        mesh.gossip.update(roots=roots)
        return _json({"cid": str(cid)})

    async def get_block(request: web.Request) -> web.Response:
        chosen = channel_source if request.query.get("via") == "channel" else source
        start = time.perf_counter()
        try:
            data = await chosen.get_block(parse_cid(request.match_info["cid"]))
        except Exception as exc:  # test route: report any failure to the test
            return _json({"error": f"{type(exc).__name__}: {exc}"}, 502)
        return _json({"size": len(data), "seconds": time.perf_counter() - start, "stats": dict(chosen.stats)})

    async def raw_frames(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            peer = mesh.peer(body["peer"])
        except MeshError as exc:
            return _json({"error": str(exc)}, 404)
        channel = peer.channels[body.get("channel", p.CONTROL)]
        for item in body["frames"]:
            channel.send(bytes.fromhex(item) if body.get("binary") else item)
        return _json({"sent": len(body["frames"])})

    async def request_peer(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            reply = await mesh.request(body["peer"], body["type"], body.get("body", {}), body.get("timeout"))
        except MeshError as exc:
            return _json({"error": f"{type(exc).__name__}: {exc}"}, 502)
        return _json(reply)

    async def connect(request: web.Request) -> web.Response:
        start = time.perf_counter()
        try:
            peer = await mesh.connect_address(request.query["address"])
        except MeshError as exc:
            return _json({"error": f"{type(exc).__name__}: {exc}"}, 502)
        elapsed = time.perf_counter() - start
        if request.query.get("close") == "1":
            await peer.close("bench")
        return _json({"seconds": elapsed, "peer": peer.peer_id})

    async def publish(request: web.Request) -> web.Response:
        body = await request.json()
        root = await ipfs.publish(body["path"])  # type: ignore[attr-defined]
        mesh.gossip.update(roots=[*mesh.gossip.fields.get("roots", []), str(root)][-256:])
        return _json({"cid": str(root)})

    async def mesh_pull(request: web.Request) -> web.Response:
        """Fetch a whole DAG with only the mesh as source; `via=channel` keeps off the peers' gateways."""
        import hashlib

        from shoal.mesh.ipfs.reader import assemble_file

        body = await request.json()
        root = parse_cid(body["cid"])
        chosen = blocks.source(prefer_http=body.get("via") != "channel")
        fetcher = ipfs.fetcher([chosen])  # type: ignore[attr-defined]
        start = time.perf_counter()
        try:
            size = await fetcher.fetch_dag(root)
        except Exception as exc:  # test route: report any failure to the test
            return _json({"error": f"{type(exc).__name__}: {exc}"}, 502)
        seconds = time.perf_counter() - start
        out = mesh.data_dir / "pulled"
        await asyncio.to_thread(assemble_file, ipfs.store, root, out)  # type: ignore[attr-defined]
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        return _json({"size": size, "sha256": digest, "seconds": seconds, "stats": dict(chosen.stats)})

    app.router.add_post("/test/publish", publish)
    app.router.add_post("/test/mesh-pull", mesh_pull)
    app.router.add_post("/test/connect", connect)
    app.router.add_post("/test/blocks", put_block)
    app.router.add_get("/test/mesh-block/{cid}", get_block)
    app.router.add_post("/test/raw", raw_frames)
    app.router.add_post("/test/request", request_peer)


async def serve(args: argparse.Namespace) -> None:
    from shoal.mesh.ipfs.config import IpfsConfig
    from shoal.mesh.ipfs.service import IpfsService

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"%(asctime)s {args.name or ''} %(levelname)s %(name)s: %(message)s",
    )
    if args.delay_ms:
        delay_outgoing_datagrams(args.delay_ms / 1000)
    identity = Identity.load_or_create(args.data_dir, name=args.name)
    events = EventBus()
    events.bind_loop(asyncio.get_running_loop())
    config = MeshConfig(
        invite=args.invite,
        secret=args.secret,
        allow=args.allow,
        bootstrap=args.bootstrap,
        mdns=args.mdns,
        ice_interfaces=args.ice,
        heartbeat_interval_s=args.heartbeat,
        dead_timeout_s=args.dead_timeout,
        gossip_interval_s=args.gossip,
        connect_timeout_s=args.connect_timeout,
        ban_s=args.ban,
        retry_max_s=args.retry_max,
        refused_retry_max_s=args.refused_retry_max,
        advertise=args.advertise,
        stun=args.stun,
        turn=args.turn,
        turn_username=args.turn_username,
        turn_password=args.turn_password,
    )
    ipfs = IpfsService(IpfsConfig(), args.data_dir, events)
    mesh = MeshService(config, identity, args.data_dir, events)
    blocks = BlockExchange(mesh, ipfs.store)
    app = web.Application(client_max_size=8 * 1024 * 1024)
    mesh.add_routes(app)
    ipfs.add_routes(app)
    test_routes(app, mesh, blocks, ipfs)
    if args.bench:
        from bench.mesh_link import bench_routes

        mesh.discovery.redial = args.bench_redial
        bench_routes(app, mesh, blocks)
    host, port = args.api.rsplit(":", 1)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    bound = runner.addresses[0]
    mesh.set_api_address(f"{bound[0]}:{bound[1]}")
    await ipfs.start()
    ipfs.add_source(blocks.source())
    await mesh.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(orjson.dumps({"ready": True, "id": identity.peer_id, "api": mesh.api_address}).decode(), flush=True)
    try:
        await stop.wait()
    finally:
        await mesh.stop()
        await ipfs.stop()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mesh.mesh_harness")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--api", default="127.0.0.1:0")
    parser.add_argument("--name")
    parser.add_argument("--invite")
    parser.add_argument("--secret")
    parser.add_argument("--allow", action="append", default=[])
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--ice", action="append", default=[])
    parser.add_argument("--no-mdns", dest="mdns", action="store_false")
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--dead-timeout", type=float, default=3.0)
    parser.add_argument("--gossip", type=float, default=2.0)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--retry-max", type=float, default=2.0)
    parser.add_argument("--refused-retry-max", type=float, default=300.0)
    parser.add_argument("--ban", type=float, default=300.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--advertise", help="API address announced to peers (default: the bound one)")
    parser.add_argument("--stun", action="append", default=[], help="stun:host:port")
    parser.add_argument("--turn", action="append", default=[], help="turn:host:port?transport=udp|tcp")
    parser.add_argument("--turn-username")
    parser.add_argument("--turn-password")
    parser.add_argument("--bench", action="store_true", help="add the routes of bench/mesh_link.py")
    parser.add_argument("--bench-redial", action="store_true",
                        help="with --bench, still dial peers learned from links (bench/mesh_nat.py)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
