"""Split/offload benchmark on loopback: TTFT and decode tok/s for local vs offload vs 2-stage vs 3-stage, with
the node processes pinned to cores (taskset) and unpinned, and the recovery time after `kill -9` of a stage.

    python bench/split.py [--tokens 32] [--runs 3] [--backend numpy] [--skip-unpinned] [--skip-pinned]
        [--delay-ms 10]   # 20 ms RTT links, emulated in process (no netem on this kernel)

Three real node processes (mesh.split_harness) on 127.0.0.1 linked over WebRTC; node a takes every request
through its OpenAI endpoint (streamed, greedy) with a forced route; routes are measured round robin.
Pinned: a on core 0, b and c on core 1 (one stage computes at a time, so b and c never compete). Prints
one table per setting and ratios to local.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# compiled shards are cached across runs and shared by the node processes (as the test suite does)
os.environ.setdefault("SHOAL_COMPILE_CACHE", str(REPO / ".cache" / "compile"))

from tests.mesh.mesh_nodes import wait_until  # noqa: E402 (after the sys.path line)
from tests.mesh.split_nodes import SplitNode, start_nodes  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def timed_stream(node: SplitNode, tokens: int, kill: SplitNode | None = None, kill_after: int = 0
                 ) -> tuple[float, float, list[float], dict]:
    """(ttft s, decode tok/s, per-token arrival times, final route) of one streamed greedy completion."""
    start = time.perf_counter()
    stamps: list[float] = []
    route: dict = {}
    for chunk in node.chat_stream(PROMPT, tokens):
        choice = chunk["choices"][0]
        if choice["delta"].get("content"):
            stamps.append(time.perf_counter() - start)
            if kill is not None and len(stamps) == kill_after:
                kill.kill()
        if choice.get("finish_reason"):
            route = chunk.get("shoal_route", {})
    ttft = stamps[0]
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return ttft, rate, stamps, route


def run_setting(label: str, pinned: bool, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    secret = os.urandom(32).hex()
    base = Path(tempfile.mkdtemp(prefix=f"shoal-bench-split-{label}-"))
    pin = (["taskset", "-c", "0"], ["taskset", "-c", "1"], ["taskset", "-c", "1"])
    cores = pin if pinned else ([], [], [])
    backend = ["--backend", args.backend, "--delay-ms", str(args.delay_ms)]
    a = SplitNode("a", base / "a", ["--serve-others", *backend], prefix=cores[0])
    b = SplitNode("b", base / "b", ["--serve-others", "--bootstrap", a.api, *backend], prefix=cores[1])
    c = SplitNode("c", base / "c", ["--serve-others", "--bootstrap", a.api, *backend], prefix=cores[2])
    nodes = [a, b, c]
    start_nodes(nodes, secret)
    results: dict[str, tuple[float, float]] = {}
    try:
        wait_until(lambda: {b.peer_id, c.peer_id} <= set(a.peers()), 60, "links")
        routes = {
            "local": ("local",),
            "offload": ("offload", (b.peer_id, "0:30")),
            "2-stage": ("split", ("local", "0:15"), (b.peer_id, "15:30")),
            "3-stage": ("split", ("local", "0:10"), (b.peer_id, "10:20"), (c.peer_id, "20:30")),
        }
        for kind, *stages in routes.values():
            a.force(kind, *stages)
            timed_stream(a, 4)  # warm-up: stages load their spans on first use
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in routes}
        overhead: dict[str, list[float]] = {name: [] for name in routes}
        for _ in range(args.runs):  # round robin: load from elsewhere on the machine hits every route alike
            for name, (kind, *stages) in routes.items():
                a.force(kind, *stages)
                ttft, rate, _, route = timed_stream(a, args.tokens)
                runs[name].append((ttft, rate))
                timing = route.get("stage_timing") or []
                calls = max((t["calls"] for t in timing), default=0)
                if calls:  # wall time of stage calls not spent computing, per engine step
                    overhead[name].append(sum(t["seconds"] - t["compute_s"] for t in timing) / calls)
        for name, samples in runs.items():
            ttfts, rates = zip(*samples, strict=True)
            results[name] = (statistics.median(ttfts), statistics.median(rates))
        print(f"\n## {label} ({'a: core 0, b+c: core 1' if pinned else 'unpinned'}), backend {args.backend}, "
              f"{args.tokens} tokens, median of {args.runs}, emulated RTT {2 * args.delay_ms:g} ms")
        print(f"{'route':10} {'TTFT ms':>9} {'decode tok/s':>13} {'vs local':>9} {'link+relay ms/step':>19}")
        local_rate = results["local"][1]
        for name, (ttft, rate) in results.items():
            extra = f"{statistics.median(overhead[name]) * 1000:19.2f}" if overhead[name] else f"{'-':>19}"
            print(f"{name:10} {ttft * 1000:9.1f} {rate:13.2f} {rate / local_rate:8.2f}x {extra}")
        print(f"offload TTFT overhead: {(results['offload'][0] - results['local'][0]) * 1000:.1f} ms")
        if args.delay_ms:
            rtt = 2 * args.delay_ms / 1000
            per_token = 1 / local_rate
            for name, remote in (("2-stage", 1), ("3-stage", 2)):
                bound = 1 / (per_token + remote * rtt)
                print(f"{name}: {results[name][1]:.2f} tok/s = {results[name][1] / bound:.2f}x the bound "
                      f"1/(compute + {remote} RTT) = {bound:.2f} tok/s at RTT {rtt * 1000:.0f} ms")
        if args.recovery:
            a.force(*routes["3-stage"])
            _, _, stamps, route = timed_stream(a, args.tokens, kill=c, kill_after=args.tokens // 3)
            gaps = [t2 - t1 for t1, t2 in itertools.pairwise(stamps)]
            typical = statistics.median(gaps)
            replay = route.get("replan_log", [{}])[0].get("seconds")
            print(f"recovery after kill -9 of stage c: longest token gap {max(gaps) * 1000:.0f} ms "
                  f"(typical {typical * 1000:.0f} ms); re-plan + replay {replay} s; "
                  f"replans {route.get('replans')}; resumed on {route.get('kind')} {route.get('spans')}")
    finally:
        for node in nodes:
            node.kill(15)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=("numpy", "tvm"), default="numpy")
    parser.add_argument("--skip-pinned", action="store_true")
    parser.add_argument("--skip-unpinned", action="store_true")
    parser.add_argument("--no-recovery", dest="recovery", action="store_false")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="emulated one-way link delay per node (in-process datagram delay; RTT = 2x)")
    args = parser.parse_args()
    if not args.skip_pinned:
        run_setting("pinned", True, args)
    if not args.skip_unpinned:
        run_setting("unpinned", False, args)
    print("\nanchor (FACTS.md, llama.cpp RPC, pinned 1 core/process): 2 stages 0.94-0.95x, 3 stages 0.90x; "
          "unpinned 0.35-0.55x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
