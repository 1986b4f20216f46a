"""Split/offload benchmark on loopback: TTFT and decode tok/s for local vs offload vs 2-stage vs 3-stage, with
the node processes pinned to cores (taskset) and unpinned, and the recovery time after `kill -9` of a stage.

    python bench/split.py [--tokens 32] [--runs 3] [--backend numpy] [--skip-unpinned] [--skip-pinned]
        [--recovery-only --recovery-rounds 5]  # kill -9 of a split stage and of an offload target, per round
        [--one-core]      # also every node on core 0: the pipeline's own cost, without the cores' speeds
        [--swapped]       # also a on core 1, b+c on core 0, and the two layouts' geometric mean (equal cores)
        [--client-core 1] # pin this process (the client) to core 1 (mirrored in the swapped layout)
        [--no-companion]  # no idle fourth member on a's core (by default each core hosts two nodes)
        [--delay-ms 10]   # 20 ms RTT links, emulated in process (no netem on this kernel)
        [--trace]         # also print where a decode step's time goes, hop by hop (median per hop)
        [--netns]         # as root: nodes in network namespaces on a bridge, tbf 50 Mbit/s per link
        [--no-deferred-delivery]  # the origin posts each step's tokens at once (A/B of models/idle.py)
        [--no-chain]      # [split] chain_stages off: every split step comes back to a (A/B of the chain)
        [--no-native-lane]  # [split] native_lane off: stage nodes take every step in Python (A/B of the lane)
        [--link-spin-us 1000]  # [split] link_spin_us: poll around a record's due time (A/B of split.arrival)
        [--origin-spin-us 1000]  # the same on the origin only (the stages' workers sleep as before)
        [--llama-rpc]     # also llama.cpp's own RPC split in every round (scripts/build_llama_rpc.sh first)

Three real node processes (tests.mesh.split_harness) on 127.0.0.1 (or, with --netns, each in its own network
namespace) linked over WebRTC; node a takes every request through its OpenAI endpoint (streamed, greedy)
with a forced route; routes are measured round robin. `local@b` is node b serving the same request itself:
the offload's TTFT overhead is given against a's local run and against b's (the same core as the offloaded
compute: the two cores of a VM need not run at the same speed).
Pinned: a on core 0, b and c on core 1 (one stage computes at a time, so b and c never compete), and an
idle fourth member d on core 0, so that each core hosts two nodes (`--companion`: without d, a decodes 3-8%
slower than b on either core). Prints one table per setting and ratios to local: of the medians, and the
median of each round's ratio (every route runs back to back in a round, so the machine's slow drifts in
speed cancel there); every row also against local@b.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# compiled shards are cached across runs and shared by the node processes (as the test suite does)
os.environ.setdefault("SHOAL_COMPILE_CACHE", str(REPO / ".cache" / "compile"))

from shoal.models.embedded import embedded_model_path  # noqa: E402

from bench import llama_rpc  # noqa: E402 (after the sys.path line)
from tests.mesh.mesh_nodes import wait_until  # noqa: E402 (after the sys.path line)
from tests.mesh.split_nodes import SplitNode, start_nodes  # noqa: E402
from tests.nodes import merged  # noqa: E402

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


def load_trace(base: Path, nodes: list[SplitNode]) -> list[tuple[float, str]]:
    """Every node's hop events (`--trace`), merged into one timeline of (time, "node:event")."""
    events = []
    for node in nodes:
        path = base / f"{node.name}.trace"
        if path.exists():
            for line in path.read_text().splitlines():
                name, at = json.loads(line)
                events.append((at, f"{node.name}:{name}"))
    events.sort()
    return events


LLAMA_ROUTES = {"local": 1, "2-stage": 2, "3-stage": 3}
"""llama.cpp's contenders (`--llama-rpc`) and their stages."""


def llama_rows(runs: dict[str, list[tuple[float, float]]], llama_runs: dict[str, list[float]]) -> None:
    """llama.cpp's split rows against llama.cpp's own local run of the same round, next to shoal's, as
    ratios and as the time a step gains over local (ms: llama.cpp's compute is slower, which flatters a
    ratio); medians of the per-round values."""
    print("llama.cpp RPC in the same rounds (client on a's core, an rpc-server per remote stage on b's and "
          "c's, the same layers):")
    print(f"  {'route':8} {'llama.cpp tok/s':>15} {'its local':>10} {'ratio':>6} {'shoal':>6} "
          f"{'+ms/step llama.cpp':>19} {'+ms/step shoal':>15}")
    for name in ("2-stage", "3-stage"):
        pairs = list(zip(llama_runs[name], llama_runs["local"], strict=True))
        mine = [(split[1], local[1]) for split, local in zip(runs[name], runs["local"], strict=True)]
        theirs_ratio = statistics.median(split / local for split, local in pairs)
        ours_ratio = statistics.median(split / local for split, local in mine)
        theirs_ms = statistics.median(1000 / split - 1000 / local for split, local in pairs)
        ours_ms = statistics.median(1000 / split - 1000 / local for split, local in mine)
        print(f"  {name:8} {statistics.median(llama_runs[name]):15.2f} "
              f"{statistics.median(llama_runs['local']):10.2f} {theirs_ratio:5.2f}x {ours_ratio:5.2f}x "
              f"{theirs_ms:19.2f} {ours_ms:15.2f}")


def gc_pauses(events: list[tuple[float, str]]
              ) -> tuple[list[tuple[float, str]], list[tuple[str, int, float, float]]]:
    """The trace's hop events without the cyclic collector's, and its pauses as (node, generation, start,
    seconds)."""
    hops, pauses = [], []
    started: dict[str, tuple[int, float]] = {}
    for at, name in events:
        node, _, event = name.partition(":")
        if event.startswith("gc") and event.endswith(".start"):
            started[node] = (int(event[2:-6]), at)
        elif event == "gc.stop":
            if node in started:
                generation, began = started.pop(node)
                pauses.append((node, generation, began, at - began))
        else:
            hops.append((at, name))
    return hops, pauses


def gc_summary(pauses: list[tuple[str, int, float, float]], windows: list[tuple[float, float]]) -> str:
    """Per node and generation: how many collections ran during `windows`, their total and longest pause."""
    seen: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    for node, generation, began, seconds in pauses:
        if any(start <= began < stop for start, stop in windows):
            seen[node, generation].append(seconds)
    if not seen:
        return "none"
    return ", ".join(f"{node} gen{generation} {len(values)}x {sum(values) * 1000:.2f} ms (max "
                     f"{max(values) * 1000:.2f})" for (node, generation), values in sorted(seen.items()))


def hop_table(events: list[tuple[float, str]], start: float, stop: float, origin: str = "a"
              ) -> list[tuple[int, str, float]]:
    """Median time between consecutive hop events of the decode steps in [start, stop) of the engine at node
    `origin`, for the most common sequence of events per step, plus the time from one step's end to the next
    step's start."""
    first = f"{origin}:e.step_start"
    steps: list[list[tuple[float, str]]] = []
    for at, name in events:
        if not start <= at < stop:
            continue
        if name == first:
            steps.append([])
        if steps:
            steps[-1].append((at, name))
    if len(steps) < 2:
        return []
    shapes = collections.Counter(tuple(n for _, n in step) for step in steps[:-1])
    shape = shapes.most_common(1)[0][0]
    gaps: dict[int, list[float]] = collections.defaultdict(list)
    for step, following in itertools.pairwise(steps):
        if tuple(n for _, n in step) != shape:
            continue
        for i, ((t1, _), (t2, _)) in enumerate(itertools.pairwise(step)):
            gaps[i].append(t2 - t1)
        gaps[len(shape) - 1].append(following[0][0] - step[-1][0])
    last = len(shape) - 1
    pairs = enumerate(itertools.pairwise(shape))
    rows = [(i, f"{a} -> {b}", statistics.median(gaps[i])) for i, (a, b) in pairs]
    rows.append((last, f"{shape[-1]} -> next {first}", statistics.median(gaps[last])))
    return rows


def host_network(args: argparse.Namespace) -> Any:
    """Three namespaces on a bridge with `tbf` 50 Mbit/s on each host's link (and netem delay where the
    kernel has it), plus a veth from this (root) namespace into the bridge so the bench reaches the APIs."""
    from tests.mesh import netns

    why_not = netns.available()
    if why_not:
        raise SystemExit(f"--netns: network namespaces unavailable: {why_not}")
    tag = f"sb{os.getpid() % 100000}"
    network = netns.HostNetwork(prefix=tag, hosts=3, subnet=f"10.214.{os.getpid() % 200 + 20}")
    network.setup("50mbit", args.delay_ms)
    root_link = f"{tag}r"
    try:
        for command in (
            ["link", "add", root_link, "type", "veth", "peer", "name", "vethr", "netns", network.bridge_ns],
            ["-n", network.bridge_ns, "link", "set", "vethr", "master", "br0", "up"],
            ["addr", "add", f"{network.subnet}.250/24", "dev", root_link],
            ["link", "set", root_link, "up"],
        ):
            subprocess.run(["ip", *command], check=True, capture_output=True, timeout=20)
    except BaseException:
        network.close()
        raise
    return network


def quantile(ordered: list[float], fraction: float) -> float:
    """The value at `fraction` of a sorted list (nearest rank below)."""
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


ALL_CORES = os.sched_getaffinity(0)
"""The cores this process may run on at start (`--client-core` narrows them for the pinned layouts only)."""
OWN = ["setsid"]
CORE_0, CORE_1 = [*OWN, "taskset", "-c", "0"], [*OWN, "taskset", "-c", "1"]
PLACEMENTS = {
    "pinned": ("a: core 0, b+c: core 1", (CORE_0, CORE_1, CORE_1)),
    "unpinned": ("unpinned", (OWN, OWN, OWN)),
    "one-core": ("a, b, c: core 0", (CORE_0, CORE_0, CORE_0)),
    "swapped": ("a: core 1, b+c: core 0", (CORE_1, CORE_0, CORE_0)),
}
"""Where the node processes run, each in a session of its own (`setsid`): the kernel's autogroup scheduling
shares the CPU fairly between sessions, so nodes left in the bench's one session would share one session's
share of a machine that other work keeps busy — two stages on two cores then get half a core's worth each,
as devices of their own would not. `one-core` measures what the pipeline itself costs: the stages take turns
on the core the local run uses, so no difference between the two cores' speeds enters the ratio. `swapped`
mirrors `pinned`; see `counterbalanced`."""


def run_setting(label: str, args: argparse.Namespace) -> dict[str, float]:
    """Runs one placement's rows and prints its table; returns each route's median per-round ratio to local
    (empty for the recovery rows)."""
    secret = os.urandom(32).hex()
    base = Path(tempfile.mkdtemp(prefix=f"shoal-bench-split-{label}-"))
    placement, cores = PLACEMENTS[label]
    if args.client_core is not None and label in ("pinned", "swapped"):
        client_core = 1 - args.client_core if label == "swapped" else args.client_core
        os.sched_setaffinity(0, {client_core})
        placement += f", client: core {client_core}"
    else:  # a layout without a client core: every core, as when the bench started
        os.sched_setaffinity(0, ALL_CORES)
    network = host_network(args) if args.netns else None
    delay = args.delay_ms if network is None or not network.netem else 0.0  # netem delays in the kernel
    instruments = ["--delay-ms", str(delay)]
    if args.switch_interval_ms is not None:
        instruments += ["--switch-interval-ms", str(args.switch_interval_ms)]
    if not args.deferred_delivery:
        instruments.append("--deliver-at-once")

    def extra(name: str) -> list[str]:
        return ["--trace", str(base / f"{name}.trace")] if args.trace else []

    def node(index: int, name: str, settings: dict) -> SplitNode:
        standby = args.recovery_only if args.standby is None else args.standby
        # no speed probe: every route here is forced, and a probe (seconds of compute on b's and c's core at
        # start) would overlap the first timed rounds
        base_settings = {"models": {"backend": args.backend},
                         "split": {"standby_spans": standby, "speed_probe": False,
                                   "offload_link": args.offload_link, "chain_stages": args.chain,
                                   "native_lane": args.native_lane, "link_spin_us": args.link_spin_us,
                                   "warm_peers_models": False}}
        settings = merged(base_settings, settings)
        if network is None:
            return SplitNode(name, base / name, settings, harness_args=instruments + extra(name),
                             prefix=cores[index])
        return SplitNode(name, base / name, merged(settings, {"mesh": {"ice_interfaces": ["eth0"]}}),
                         harness_args=instruments + extra(name),
                         prefix=[*network.exec_prefix(index), *cores[index]], host=network.address(index),
                         key=secret[:32])

    origin_spin = {} if args.origin_spin_us is None else {"split": {"link_spin_us": args.origin_spin_us}}
    a = node(0, "a", origin_spin)
    b = node(1, "b", {"mesh": {"bootstrap": [a.api]}})
    c = node(2, "c", {"mesh": {"bootstrap": [a.api]}})
    nodes = [a, b, c]
    if args.companion and label in ("pinned", "swapped"):  # idle, as c is while b serves local@b
        nodes.append(node(0, "d", {"mesh": {"bootstrap": [a.api]}}))
        placement += ", idle d: a's core"
    try:
        start_nodes(nodes, secret)
    except BaseException:
        if network is not None:
            network.close()
        raise
    results: dict[str, tuple[float, float]] = {}
    round_ratios: dict[str, float] = {}
    llama = None
    try:
        if args.llama_rpc and not args.recovery_only and network is None:
            llama = llama_rpc.LlamaRpc(embedded_model_path(), [cores[1], cores[2]], cores[0])
        wait_until(lambda: {n.peer_id for n in nodes[1:]} <= set(a.peers()), 60, "links")
        if args.recovery_only:
            routes_now = {"3-stage": ("split", ("local", "0:10"), (b.peer_id, "10:20"), (c.peer_id, "20:30")),
                          "offload": ("offload", (b.peer_id, "0:30"))}
            print(f"\n## {label} ({placement}), backend {args.backend}, {args.tokens} tokens")
            recovery_rows(a, {"3-stage": (c, routes_now["3-stage"]), "offload": (b, routes_now["offload"])},
                          nodes, secret, args)
            return round_ratios
        routes = {
            "local": ("local",),
            "offload": ("offload", (b.peer_id, "0:30")),
            "2-stage": ("split", ("local", "0:15"), (b.peer_id, "15:30")),
            "3-stage": ("split", ("local", "0:10"), (b.peer_id, "10:20"), (c.peer_id, "20:30")),
            "local@b": ("local",),  # b serving its own API: the offload target's compute without the link
        }
        origin = {name: b if name == "local@b" else a for name in routes}
        for name, (kind, *stages) in routes.items():
            origin[name].force(kind, *stages)
            timed_stream(origin[name], 4)  # warm-up: stages load their spans on first use
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in routes}
        overhead: dict[str, list[float]] = {name: [] for name in routes}
        windows: dict[str, list[tuple[float, float]]] = {name: [] for name in routes}
        llama_runs: dict[str, list[float]] = {name: [] for name in LLAMA_ROUTES}
        for _ in range(args.runs):  # round robin: load from elsewhere on the machine hits every route alike
            for name, (kind, *stages) in routes.items():
                origin[name].force(kind, *stages)
                began = time.perf_counter()
                ttft, rate, _, route = timed_stream(origin[name], args.tokens)
                windows[name].append((began, time.perf_counter()))
                runs[name].append((ttft, rate))
                timing = route.get("stage_timing") or []
                calls = max((t["calls"] for t in timing), default=0)
                if calls and not any(t.get("chained") for t in timing):  # a chain's steps: not known here
                    # wall time of stage calls not spent computing, per engine step
                    overhead[name].append(sum(t["seconds"] - t["compute_s"] for t in timing) / calls)
            if llama is not None:
                for name, stages in LLAMA_ROUTES.items():
                    llama_runs[name].append(llama.decode_rate(stages, args.tokens))
        for name, samples in runs.items():
            ttfts, rates = zip(*samples, strict=True)
            results[name] = (statistics.median(ttfts), statistics.median(rates))
        where = "loopback" if network is None else "namespaces, tbf 50 Mbit/s"
        how = " (netem)" if network is not None and network.netem else " (in-process delay)"
        print(f"\n## {label} ({placement}), backend {args.backend}, "
              f"{args.tokens} tokens, median of {args.runs}, {where}, "
              f"emulated RTT {2 * args.delay_ms:g} ms{how if args.delay_ms else ''}")
        print(f"{'route':10} {'TTFT ms':>9} {'decode tok/s':>13} {'vs local':>9} {'per round (p25-p75)':>20} "
              f"{'link+relay ms/step':>19}")
        local_rate = results["local"][1]
        for name, (ttft, rate) in results.items():
            # each round runs every route back to back: its ratio is untouched by the machine's slow drifts
            ratios = sorted(mine[1] / local[1] for mine, local in zip(runs[name], runs["local"], strict=True))
            round_ratios[name] = statistics.median(ratios)
            low, high = quantile(ratios, 0.25), quantile(ratios, 0.75)
            spread = f"{statistics.median(ratios):.2f}x ({low:.2f}-{high:.2f})"
            extra = f"{statistics.median(overhead[name]) * 1000:19.2f}" if overhead[name] else f"{'-':>19}"
            print(f"{name:10} {ttft * 1000:9.1f} {rate:13.2f} {rate / local_rate:8.2f}x {spread:>20} {extra}")
        # b's core runs all of an offload's compute and most of a split's (the head's stage); b shares its
        # core with c, and on this VM a node alone on its core (a) decodes 3-8% slower than one that shares
        # it: local@b is the stricter baseline for every row
        for name, why in (("offload", "b's own decode, the same core as the offloaded compute"),
                          ("2-stage", "the core of most of the compute"),
                          ("3-stage", "the core of most of the compute")):
            own = sorted(mine[1] / at_b[1] for mine, at_b in zip(runs[name], runs["local@b"], strict=True))
            print(f"{name} vs local@b ({why}): {results[name][1] / results['local@b'][1]:.2f}x of the "
                  f"medians, median per-round ratio {statistics.median(own):.2f}x "
                  f"({quantile(own, 0.25):.2f}-{quantile(own, 0.75):.2f})")
        if llama is not None:
            llama_rows(runs, llama_runs)
        over_a, over_b = (1000 * (results["offload"][0] - results[name][0]) for name in ("local", "local@b"))
        print(f"offload TTFT overhead: {over_a:.1f} ms against a's local run, {over_b:.1f} ms against b's "
              "own (the same device and core as the offloaded compute)")
        if args.trace:
            events, pauses = gc_pauses(load_trace(base, nodes))
            for name in ("local", "2-stage", "3-stage", "local@b"):
                who = "b" if name == "local@b" else "a"
                rows: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
                for began, ended in windows[name]:
                    for index, hop, seconds in hop_table(events, began, ended, who):
                        rows[index, hop].append(seconds)
                print(f"\n{name}: median time per hop of a decode step (us)")
                for (_, hop), values in sorted(rows.items()):
                    print(f"  {statistics.median(values) * 1e6:8.0f}  {hop}")
                steps = sorted(t2 - t1 for began, ended in windows[name] for t1, t2 in itertools.pairwise(
                    at for at, event in events if event == f"{who}:e.step_start" and began <= at < ended))
                if steps:
                    q = [quantile(steps, f) * 1000 for f in (0.5, 0.9, 0.99)]
                    print(f"  step ms: median {q[0]:.2f}, p90 {q[1]:.2f}, p99 {q[2]:.2f}, "
                          f"max {steps[-1] * 1000:.2f} ({len(steps)} steps)")
                print(f"  gc pauses: {gc_summary(pauses, windows[name])}")
        if args.delay_ms:
            rtt = 2 * args.delay_ms / 1000
            per_token = 1 / local_rate
            for name, remote in (("2-stage", 1), ("3-stage", 2)):
                # one-way hops a step: to and from each remote stage, or through a chain of them and back
                hops = remote + 1 if args.chain else 2 * remote
                bound = 1 / (per_token + hops * rtt / 2)
                print(f"{name}: {results[name][1]:.2f} tok/s = {results[name][1] / bound:.2f}x the bound "
                      f"1/(compute + {hops} one-way delays) = {bound:.2f} tok/s at RTT {rtt * 1000:.0f} ms")
        if args.recovery:
            recovery_rows(a, {"3-stage": (c, routes["3-stage"]), "offload": (b, routes["offload"])},
                          [a, b, c], secret, args)
    finally:
        if llama is not None:
            llama.close()
        for n in nodes:
            n.kill(15)
        if network is not None:
            network.close()  # deleting the bridge's namespace takes the root veth with it
        if args.keep:
            print(f"node data dirs and logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)  # node data dirs: ~280 MB each run
    return round_ratios


def counterbalanced(pinned: dict[str, float], swapped: dict[str, float]) -> None:
    """Prints each route's ratio to local as the geometric mean of the two mirrored layouts. The cores of a VM
    need not run at one speed (local@b has ranged 0.89-1.13x here), and in `pinned` the remote stages all run
    on core 1: a faster core 1 lifts the split rows, a slower one sinks them. `swapped` turns the difference
    round. If core 1 is s times as fast and the origin's stage does a share f of the compute, pinned scales
    the equal-cores ratio by 1 / (f + (1 - f) / s) and swapped by 1 / (f + (1 - f) s); their product is
    1 / (1 + f (1 - f) (s - 1)^2 / s), so the geometric mean is the equal-cores ratio to second order in
    s - 1 (s = 1.08, f = 1/4: within 0.1%)."""
    print("\n## counterbalanced: geometric mean of pinned (a: core 0) and swapped (a: core 1), "
          "median per-round ratios to local")
    print(f"{'route':10} {'pinned':>8} {'swapped':>8} {'equal cores':>12}")
    for name in ("offload", "2-stage", "3-stage", "local@b"):
        if name in pinned and name in swapped:
            mean = (pinned[name] * swapped[name]) ** 0.5
            print(f"{name:10} {pinned[name]:7.2f}x {swapped[name]:7.2f}x {mean:11.2f}x")


def _serving(origin: SplitNode, node: SplitNode) -> bool:
    peer = origin.peers().get(node.peer_id)
    return peer is not None and bool(peer["advert"].get("split", {}).get("serve_others"))


def recovery_rows(a: SplitNode, victims: dict[str, tuple[SplitNode, tuple]], nodes: list[SplitNode],
                  secret: str, args: argparse.Namespace) -> None:
    """`kill -9` of a stage (3-stage split: c) and of an offload target (b) mid-stream, `--recovery-rounds`
    times each (the victim is started again between rounds): the longest gap between two tokens at the
    client, median over rounds, and whether the text equals an undisturbed local run."""
    a.force("local")
    want = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in a.chat_stream(PROMPT,
                                                                                               args.tokens))
    for name, (victim, route) in victims.items():
        longest: list[float] = []
        typical: list[float] = []
        phases: list[dict] = []
        same = 0
        for _ in range(args.recovery_rounds):
            if victim.process is None or victim.process.poll() is not None:
                victim.launch(secret).wait_ready()
                wait_until(lambda v=victim: _serving(a, v), 60, f"{victim.name} linked again")
            a.force(*route)
            timed_stream(a, 4)  # the victim loads (or compiles) its span before the measured run
            text: list[str] = []
            start = time.perf_counter()
            stamps: list[float] = []
            final: dict = {}
            for chunk in a.chat_stream(PROMPT, args.tokens):
                choice = chunk["choices"][0]
                if choice["delta"].get("content"):
                    text.append(choice["delta"]["content"])
                    stamps.append(time.perf_counter() - start)
                    if len(stamps) == args.tokens // 3 and victim.process is not None:
                        victim.process.kill()  # SIGKILL, not waited for here: the client's clock runs on
                if choice.get("finish_reason"):
                    final = chunk.get("shoal_route", {})
            victim.kill()  # reaps it
            gaps = [t2 - t1 for t1, t2 in itertools.pairwise(stamps)]
            longest.append(max(gaps))
            typical.append(statistics.median(gaps))
            same += "".join(text) == want
            log = final.get("replan_log") or [{}]
            phases.append(log[0])
        rows = ", ".join(f"{g * 1000:.0f}" for g in longest)
        print(f"recovery after kill -9 of the {name} peer ({victim.name}), {args.recovery_rounds} rounds: "
              f"longest token gap median {statistics.median(longest) * 1000:.0f} ms (rounds: {rows} ms; "
              f"typical gap {statistics.median(typical) * 1000:.0f} ms); text equal to local in {same} of "
              f"{args.recovery_rounds}")
        keys = sorted({k for p in phases for k, v in p.items()
                       if isinstance(v, int | float) and k != "at_tokens"})
        for key in keys:
            values = [p[key] for p in phases if key in p]
            print(f"  {key}: median {statistics.median(values) * 1000:.0f} ms "
                  f"({', '.join(f'{v * 1000:.0f}' for v in values)})")
    a.force(None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=("numpy", "tvm"), default="numpy")
    parser.add_argument("--skip-pinned", action="store_true")
    parser.add_argument("--skip-unpinned", action="store_true")
    parser.add_argument("--no-recovery", dest="recovery", action="store_false")
    parser.add_argument("--recovery-rounds", type=int, default=1,
                        help="kill -9 rounds per recovery row (the victim restarts between rounds)")
    parser.add_argument("--recovery-only", action="store_true", help="only the recovery rows")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' data dirs and logs")
    parser.add_argument("--standby", action=argparse.BooleanOptionalAction, default=None,
                        help="[split] standby_spans on the nodes (default: on with --recovery-only only; its "
                             "background loads and compiles would compete with the timed rounds)")
    parser.add_argument("--offload-link", action=argparse.BooleanOptionalAction, default=True,
                        help="[split] offload_link: an offload's tokens over a direct link (default) or, "
                             "with --no-offload-link, over the data channel (an A/B of the two)")
    parser.add_argument("--deferred-delivery", action=argparse.BooleanOptionalAction, default=True,
                        help="the origin posts a step's tokens while the next step waits on a peer (default; "
                             "models/idle.py) or, with --no-deferred-delivery, at once (an A/B of the two)")
    parser.add_argument("--chain", action=argparse.BooleanOptionalAction, default=True,
                        help="[split] chain_stages: the 3-stage split's steps pass b -> c -> a (default) or, "
                             "with --no-chain, come back to a between b and c (an A/B of the two)")
    parser.add_argument("--native-lane", action=argparse.BooleanOptionalAction, default=True,
                        help="[split] native_lane: the stage nodes take steady decode steps in one native "
                             "call each way (default) or, with --no-native-lane, in Python (an A/B)")
    parser.add_argument("--link-spin-us", type=int, default=0,
                        help="[split] link_spin_us on the nodes: poll for a direct link's next record around "
                             "when it is due (split.arrival; 0, the default: never)")
    parser.add_argument("--origin-spin-us", type=int, default=None,
                        help="[split] link_spin_us on the origin (a) only, overriding --link-spin-us there")
    parser.add_argument("--one-core", action="store_true",
                        help="also run every node on core 0 (the pipeline's own cost, without core speed)")
    parser.add_argument("--swapped", action="store_true",
                        help="also run a on core 1 and b+c on core 0, and print each route's geometric mean "
                             "of the two layouts (the cores' speeds cancel)")
    parser.add_argument("--client-core", type=int, choices=(0, 1),
                        help="pin this process, the client reading every stream, to a core in the pinned "
                             "layout (in the swapped layout to the other one); unpinned it tends to share "
                             "the origin's core, which slows a's local run more than a split, where a's core "
                             "waits on the stages")
    parser.add_argument("--companion", action=argparse.BooleanOptionalAction, default=True,
                        help="an idle fourth member, d, on a's core in the pinned and swapped layouts "
                             "(default), so that each core hosts two nodes: on this VM a node alone on its "
                             "core decodes 3-8%% slower than one sharing it with an idle node, which made "
                             "a's local run the slow one (local@b > 1) and flattered every split row")
    parser.add_argument("--llama-rpc", action="store_true",
                        help="also run llama.cpp's own split (its RPC backend: scripts/build_llama_rpc.sh) "
                             "in every round, its client on a's core and its servers on b's and c's, and "
                             "compare each split row's ratio to local with llama.cpp's")
    parser.add_argument("--netns", action="store_true",
                        help="run each node in its own network namespace behind a 50 Mbit/s tbf link (root)")
    parser.add_argument("--trace", action="store_true", help="print a per-hop breakdown of decode steps")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="emulated one-way link delay per node (in-process datagram delay; RTT = 2x)")
    parser.add_argument("--switch-interval-ms", type=float,
                        help="the nodes' GIL switch interval (default: CPython's 5 ms, as `shoal node`)")
    args = parser.parse_args()
    if args.llama_rpc and (why := llama_rpc.missing()):
        parser.error(f"--llama-rpc: {why}")
    pinned = {} if args.skip_pinned else run_setting("pinned", args)
    if args.swapped:
        counterbalanced(pinned, run_setting("swapped", args))
    if not args.skip_unpinned:
        run_setting("unpinned", args)
    if args.one_core:
        run_setting("one-core", args)
    if not args.llama_rpc:
        print("\nanchor (FACTS.md, llama.cpp RPC, pinned 1 core/process): 2 stages 0.94-0.95x, 3 stages "
              "0.90x; unpinned 0.35-0.55x (--llama-rpc runs it in the same rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
