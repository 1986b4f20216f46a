"""Automatic placement on loopback: does the scheduler's own choice pay off? Three real `shoal node` processes
(tests.nodes.NodeProcess), every routing setting at its default.

    python bench/placement.py [--rounds 5] [--tokens 32] [--clients 4] [--slow 0.1] [--backend numpy]

- **slow → fast**: node a is a slow device (its CPU capped to `--slow` of one core: tests.cpu_cap, a cgroup v1
  cpu quota or a SIGSTOP/SIGCONT duty cycle); b and c are not. One streamed greedy request at a with
  `x-shoal-route: local` against the same request left to the scheduler (`auto`): TTFT and time to the last
  token (TTLT), and where auto sent it.
- **spread**: `--clients` requests at once at node b: all forced local (`x-shoal-route: local`: b alone, as
  without a mesh) against all left to the scheduler (b and its idle equal peer c): aggregate tok/s (every
  client's tokens over the wall time of the burst) and how many went to a peer.

b is pinned to core 0, c and a to core 1 (two devices of one core each; a's cap applies on top), and each
node runs in a session of its own (`setsid`): with the kernel's autogroup scheduling (on by default, as here)
the CPU is shared fairly between sessions, so three nodes started from the bench's one session would share
one session's share of a machine other work keeps busy — a peer's core then adds no CPU to the mesh, and
spreading a burst could only add overhead (docs/split.md, *Placement*, measured both ways). Each burst also
reports the CPU time each node got and the time its threads waited
for a CPU (/proc schedstat): where the wait is of the order of the CPU time, the machine was too busy for
the burst's numbers to say much about spreading. Each round
runs both contenders of a scenario back to back, alternating which goes first; ratios are the median of the
per-round ratios (auto over local), with the quartiles. `--settle` seconds pass between scenarios: a plan
reads peers' load from their adverts (refreshed every second), so a request right after a burst can still
see the burst's load and stay local. Every node measures its speed when its model loads
(`split.speed_probe`); nodes start one after the other so that no probe shares a core with another's start.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SHOAL_COMPILE_CACHE", str(REPO / ".cache" / "compile"))

from tests.cpu_cap import CpuCap  # noqa: E402 (after the sys.path line)
from tests.mesh.mesh_nodes import wait_until  # noqa: E402
from tests.nodes import NodeProcess  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def stream(node: NodeProcess, tokens: int, route: str | None) -> tuple[float, float, int, dict[str, Any]]:
    """(ttft s, ttlt s, tokens, shoal_route) of one streamed greedy chat completion."""
    messages = [{"role": "user", "content": PROMPT}]
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": tokens, "temperature": 0,
                       "stream": True}).encode()
    headers = {"Content-Type": "application/json", **({"x-shoal-route": route} if route else {})}
    conn = http.client.HTTPConnection(node.host, node.port, timeout=600)
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    shoal_route: dict[str, Any] = {}
    try:
        conn.request("POST", "/v1/chat/completions", body, headers)
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{node.name}: HTTP {response.status}: {response.read()[:300]!r}")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter() - start
                first = first or last
                count += 1
            shoal_route = chunk.get("shoal_route") or shoal_route
    finally:
        conn.close()
    return first, last, count, shoal_route


def burst(node: NodeProcess, clients: int, tokens: int, route: str | None
          ) -> tuple[float, int, list[tuple[str, float]]]:
    """(aggregate tok/s, tokens, (where, ttlt s) of each request) of `clients` requests started together."""
    results: list[Any] = [None] * clients

    def one(i: int) -> None:
        try:
            results[i] = stream(node, tokens, route)
        except Exception as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"burst failed: {errors[0]}")
    total = sum(r[2] for r in results)
    where = [("peer" if r[3].get("kind") == "offload" else r[3].get("kind", "?"), r[1]) for r in results]
    return total / wall, total, where


def cpu_seconds(node: NodeProcess) -> tuple[float, float]:
    """(CPU time, time waiting for a CPU) of all the node process's threads so far, from /proc schedstat."""
    pid = node.process.pid if node.process is not None else 0
    ran = waited = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
        except OSError:  # a thread that ended meanwhile
            continue
        ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran / 1e9, waited / 1e9


def speed(node: NodeProcess) -> dict[str, Any]:
    return node.get("/v1/mesh/route")["advert"].get("speed", {}).get(MODEL, {})


def ratio_cell(ratios: list[float]) -> str:
    ordered = sorted(ratios)
    if len(ordered) < 2:
        return f"{ordered[0]:.2f}x"
    q = statistics.quantiles(ordered, n=4)
    return f"{statistics.median(ordered):.2f}x ({q[0]:.2f}-{q[2]:.2f})"


def start_mesh(base: Path, args: argparse.Namespace) -> tuple[list[NodeProcess], CpuCap]:
    secret = os.urandom(32).hex()
    env = {"OPENBLAS_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"}

    def settings(*bootstrap: NodeProcess) -> dict[str, Any]:
        mesh: dict[str, Any] = {"secret": secret, "gossip_interval_s": 1.0}
        if bootstrap:
            mesh["bootstrap"] = [n.api for n in bootstrap]
        # one probe per node, at its start: a periodic re-probe must not land inside a measured round
        return {"models": {"backend": args.backend}, "mesh": mesh, "split": {"speed_probe_every_min": 0}}

    def device(core: int) -> list[str]:  # a session of its own: its own share of the CPU (module docstring)
        return ["setsid", "taskset", "-c", str(core)]

    b = NodeProcess("b", base / "b", settings(), env=env, prefix=device(0))
    c = NodeProcess("c", base / "c", settings(b), env=env, prefix=device(1))
    a = NodeProcess("a", base / "a", settings(b, c), env=env, prefix=device(1))
    cap = CpuCap(0, args.slow)
    started: list[NodeProcess] = []
    try:
        for node in (b, c, a):
            node.launch()
            started.append(node)
            if node is a:
                cap = CpuCap(a.process.pid, args.slow).start()  # type: ignore[union-attr]
            node.wait_ready(300)
            wait_until(lambda n=node: speed(n).get("decode_tok_s"), 600, f"{node.name}'s speed probe")

        def peers_seen(node: NodeProcess, *peers: NodeProcess) -> bool:
            seen = {x["id"] for x in node.get("/v1/mesh/peers")["peers"] if x.get("advert", {}).get("speed")}
            return all(p.peer_id in seen for p in peers)

        wait_until(lambda: peers_seen(a, b, c) and peers_seen(b, c), 120, "speeds advertised")
    except BaseException:
        cap.stop()
        for node in started:
            node.stop(timeout_s=15)
        raise
    return [a, b, c], cap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--slow", type=float, default=0.1, help="a's CPU cap, a fraction of one core")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "tvm"])
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds between scenarios, so peers' adverted load is current (0: none)")
    args = parser.parse_args()
    if shutil.which("taskset") is None or shutil.which("setsid") is None:
        print("taskset and setsid are needed (util-linux)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="shoal-placement-"))
    print(f"load before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    (a, b, c), cap = start_mesh(base, args)
    try:
        print(f"a capped to {args.slow:.0%} of a core ({cap.method}); measured speeds (speed probe):")
        for node in (a, b, c):
            s = speed(node)
            print(f"  {node.name}: decode {s.get('decode_tok_s')} tok/s, "
                  f"prefill {s.get('prefill_tok_s')} tok/s, batch cost {s.get('batch_cost')}, "
                  f"steps with 1-4 requests {s.get('batch_steps')}")
        slow: dict[str, list[tuple[float, float]]] = {"local": [], "auto": []}
        slow_where: list[str] = []
        spread: dict[str, list[float]] = {"local": [], "auto": []}
        spread_where: list[tuple[str, float]] = []
        spread_local: list[float] = []
        spread_cpu: dict[str, list[tuple[float, float, float, float]]] = {"local": [], "auto": []}
        """Per burst: (b's CPU s, b's wait s, c's CPU s, c's wait s)."""
        stream(a, 4, "local")  # warm both paths once
        stream(a, 4, None)
        for r in range(args.rounds):
            order = ["local", "auto"] if r % 2 == 0 else ["auto", "local"]
            for name in order:
                ttft, ttlt, _, route = stream(a, args.tokens, "local" if name == "local" else None)
                slow[name].append((ttft, ttlt))
                if name == "auto":
                    slow_where.append(route.get("kind", "?"))
            time.sleep(args.settle)  # the adverts catch up with the load just ended (advert_refresh_s 1 s)
            for name in order:
                before = cpu_seconds(b), cpu_seconds(c)
                rate, _, where = burst(b, args.clients, args.tokens, "local" if name == "local" else None)
                after = cpu_seconds(b), cpu_seconds(c)
                spread_cpu[name].append(tuple(y - x for was, now in zip(before, after, strict=True)
                                              for x, y in zip(was, now, strict=True)))  # type: ignore[arg-type]
                spread[name].append(rate)
                if name == "auto":
                    spread_where += where
                else:
                    spread_local += [t for _, t in where]
            time.sleep(args.settle)
            print(f"  round {r + 1}: slow ttlt local {slow['local'][-1][1]:.2f} s "
                  f"auto {slow['auto'][-1][1]:.2f} s; burst local {spread['local'][-1]:.1f} tok/s "
                  f"auto {spread['auto'][-1]:.1f} tok/s")
    finally:
        cap.stop()
        for node in (a, b, c):
            node.stop(timeout_s=15)
    print(f"load after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")

    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(f"\nslow -> fast: one request at a ({args.tokens} tokens, {args.rounds} rounds, "
          f"backend {args.backend})")
    print(f"{'route':8} {'TTFT s':>8} {'TTLT s':>8}  {'TTFT local/auto':>18} {'TTLT local/auto':>18}  where")
    for name in ("local", "auto"):
        ttft = med([t for t, _ in slow[name]])
        ttlt = med([t for _, t in slow[name]])
        if name == "local":
            print(f"{name:8} {ttft:8.3f} {ttlt:8.3f}  {'1.00x':>18} {'1.00x':>18}  local")
        else:
            ttft_r = [lo[0] / au[0] for lo, au in zip(slow["local"], slow["auto"], strict=True)]
            ttlt_r = [lo[1] / au[1] for lo, au in zip(slow["local"], slow["auto"], strict=True)]
            kinds = ", ".join(f"{k} {slow_where.count(k)}" for k in sorted(set(slow_where)))
            print(f"{name:8} {ttft:8.3f} {ttlt:8.3f}  {ratio_cell(ttft_r):>18} {ratio_cell(ttlt_r):>18}  "
                  f"{kinds}")
    print(f"\nspread: {args.clients} clients at once at b ({args.tokens} tokens each); local = b alone")
    print(f"{'route':8} {'tok/s':>8}  {'auto/local':>18}  where (median TTLT of those requests)")
    ratios = [au / lo for lo, au in zip(spread["local"], spread["auto"], strict=True)]
    print(f"{'local':8} {med(spread['local']):8.1f}  {'1.00x':>18}  local {len(spread_local)} "
          f"({med(spread_local):.2f} s)")
    kinds = sorted({k for k, _ in spread_where})
    cells = [f"{k} {sum(1 for w, _ in spread_where if w == k)} "
             f"({med([t for w, t in spread_where if w == k]):.2f} s)" for k in kinds]
    print(f"{'auto':8} {med(spread['auto']):8.1f}  {ratio_cell(ratios):>18}  {', '.join(cells)}")
    print("CPU per burst (median s; 'waited' = runnable but waiting for a CPU):")
    for name in ("local", "auto"):
        cpu = [med([burst_cpu[i] for burst_cpu in spread_cpu[name]]) for i in range(4)]
        print(f"  {name:6} b ran {cpu[0]:.2f} waited {cpu[1]:.2f}; c ran {cpu[2]:.2f} waited {cpu[3]:.2f}")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
