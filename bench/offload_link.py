"""An offload's tokens over the direct link against the data channel, in one run: what each costs the serving
node's event loop and its decode.

    python bench/offload_link.py [--backend tvm] [--tokens 64] [--rounds 7]

Three real node processes on 127.0.0.1 (tests.mesh.split_harness), each in a session of its own: `direct`
(origin, `[split] offload_link` on) and `channel` (origin, `offload_link` off) on core 0, and b, which serves
both, on core 1. Every round runs, in an order that rotates round by round, one streamed greedy completion
offloaded from each origin to b, and one that b serves itself (`local@b`: b's own decode on the same core,
the issue's reference). Measured per request: the decode tok/s at the client, and the CPU time per token of
b's event loop (its main thread) and of the origin's, from /proc/PID/task/TID/schedstat — CPU accounting,
which load from other work disturbs far less than wall time. Prints the medians and the median of the
per-round ratios to `local@b` (p25-p75), and each route's loop cost against `local@b`'s.

A node's loop also runs while no request does (heartbeats, gossip, SCTP timers of its links: ~20-30 ms a
second each on this VM, i.e. ~0.5 ms a token at 40-50 tok/s), so each loop's idle rate is measured first
(`--idle-s` seconds with no request) and the `net` columns take that rate × the request's wall time off:
what the request itself cost the loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SHOAL_COMPILE_CACHE", str(REPO / ".cache" / "compile"))

from bench.split import CORE_0, CORE_1, quantile, timed_stream  # noqa: E402
from tests.mesh.mesh_nodes import wait_until  # noqa: E402
from tests.mesh.split_nodes import SplitNode, start_nodes  # noqa: E402


def loop_cpu_s(node: SplitNode) -> float:
    """CPU seconds the node's main thread (its event loop) has run."""
    assert node.process is not None
    pid = node.process.pid
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("numpy", "tvm"), default="tvm")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--idle-s", type=float, default=4.0,
                        help="seconds of no request over which each loop's idle CPU rate is measured")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="shoal-bench-offload-link-"))
    secret = os.urandom(32).hex()
    split = {"standby_spans": False, "speed_probe": False, "warm_peers_models": False}

    def node(name: str, core: list[str], **extra: object) -> SplitNode:
        settings = {"models": {"backend": args.backend}, "split": {**split, **extra}}
        return SplitNode(name, base / name, settings, harness_args=["--delay-ms", "0"], prefix=core)

    b = node("b", CORE_1)
    direct = node("direct", CORE_0, offload_link=True)
    channel = node("channel", CORE_0, offload_link=False)
    for origin in (direct, channel):
        origin.settings["mesh"] = {"bootstrap": [b.api]}
    nodes = [b, direct, channel]
    start_nodes(nodes, secret)
    try:
        wait_until(lambda: b.peer_id in direct.peers() and b.peer_id in channel.peers(), 60, "links")
        b.force("local")
        for origin in (direct, channel):
            origin.force("offload", (b.peer_id, "0:30"))
        routes: dict[str, tuple[SplitNode, SplitNode]] = {"direct": (direct, b), "channel": (channel, b),
                                                          "local@b": (b, b)}
        for asker, _ in routes.values():  # warm up: compile caches, first-request costs
            timed_stream(asker, 8)
        before = [loop_cpu_s(n) for n in nodes]
        began = time.monotonic()
        time.sleep(args.idle_s)
        took = time.monotonic() - began
        idle = {n.name: (loop_cpu_s(n) - c) / took for n, c in zip(nodes, before, strict=True)}
        rate: dict[str, list[float]] = {r: [] for r in routes}
        b_loop: dict[str, list[float]] = {r: [] for r in routes}
        origin_loop: dict[str, list[float]] = {r: [] for r in routes}
        b_net: dict[str, list[float]] = {r: [] for r in routes}
        origin_net: dict[str, list[float]] = {r: [] for r in routes}
        names = list(routes)
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for route in order:
                asker, server = routes[route]
                b0, a0, t0 = loop_cpu_s(server), loop_cpu_s(asker), time.monotonic()
                _, tok_s, stamps, _ = timed_stream(asker, args.tokens)
                b1, a1, wall = loop_cpu_s(server), loop_cpu_s(asker), time.monotonic() - t0
                rate[route].append(tok_s)
                b_loop[route].append((b1 - b0) / len(stamps) * 1e6)
                origin_loop[route].append((a1 - a0) / len(stamps) * 1e6)
                b_net[route].append((b1 - b0 - idle[server.name] * wall) / len(stamps) * 1e6)
                origin_net[route].append((a1 - a0 - idle[asker.name] * wall) / len(stamps) * 1e6)
            time.sleep(0.2)
        print(f"\n## offload tokens: direct link vs data channel, backend {args.backend}, {args.tokens} "
              f"tokens, {args.rounds} rounds (origins: core 0, b: core 1); load {os.getloadavg()[0]:.1f}")
        print("loops' idle CPU, ms/s: " + ", ".join(f"{n} {r * 1e3:.1f}" for n, r in idle.items()))
        print(f"{'route':10} {'decode tok/s':>13} {'vs local@b, per round (p25-p75)':>33} "
              f"{'b loop us/token':>16} {'origin loop us/token':>21} {'b net':>7} {'origin net':>11}")
        for route in names:
            ratios = sorted(x / y for x, y in zip(rate[route], rate["local@b"], strict=True))
            spread = f"({quantile(ratios, 0.25):.2f}-{quantile(ratios, 0.75):.2f})"
            print(f"{route:10} {statistics.median(rate[route]):13.2f} {statistics.median(ratios):>15.2f}x "
                  f"{spread:<16} {statistics.median(b_loop[route]):16.0f} "
                  f"{statistics.median(origin_loop[route]):21.0f} {statistics.median(b_net[route]):7.0f} "
                  f"{statistics.median(origin_net[route]):11.0f}")
        extra = {r: sorted(x - y for x, y in zip(b_loop[r], b_loop["local@b"], strict=True))
                 for r in names[:2]}
        print("b's loop per token over local@b's, median of per-round differences: "
              + ", ".join(f"{r} {statistics.median(d):+.0f} us" for r, d in extra.items()))
        relay = {r: sorted(x - y for x, y in zip(origin_net[r], b_net["local@b"], strict=True))
                 for r in names[:2]}
        print("the origin's loop per relayed token (net of idle) over local@b's loop per served token (net), "
              "median of per-round differences: "
              + ", ".join(f"{r} {statistics.median(d):+.0f} us" for r, d in relay.items()))
    finally:
        for n in nodes:
            n.kill(15)


if __name__ == "__main__":
    main()
