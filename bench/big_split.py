"""The big model across members' budgets: decode tok/s of a model no member can hold alone, split
automatically over three node processes, against one node that can hold it (issue 17: ≥ 0.9×).

    python bench/big_split.py [--shape llama-3.2-3b] [--mix q4_k_m] [--backend tvm] [--tokens 32]
        [--rounds 5] [--share 0.45] [--keep]

`tests.mesh.big_split.BigMesh`: a publisher that holds the file and two members that hold nothing (origin,
helper), each with a memory budget of `--share` of what the planner estimates the whole model needs (so no
member, and no two, can hold it), on 127.0.0.1 over WebRTC with default settings (no forced route); plus a
fourth node, `single`, that holds the file with a budget that fits it. Every round runs one greedy chat
completion at the origin (a 3-stage split: each stage fetched only its layers by CID on first use) and one at
`single` (local), in alternating order; decode tok/s is the node's own measure (`shoal_route.observed`,
time after the first token ÷ tokens after it). Prints each round, the medians, the median of the per-round
ratios, and the bytes each stage fetched. The first request of each (fetch + compile) is a warm-up, not
timed. The weights are random noise (`bench/shaped_gguf.py`): the tokens of both are compared, not judged.
`[split] standby_spans` is off unless `--standby` (its background fetches and compiles of the spans a re-plan
would need compete with the timed rounds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SHOAL_COMPILE_CACHE", str(REPO / ".cache" / "compile"))

from tests.mesh.big_split import NAME, BigMesh, chat, shaped_file, span_fetches  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def decode_rate(reply: dict, kind: str) -> float:
    if "error" in reply:
        raise RuntimeError(f"request failed: {reply['error']}")
    route = reply["shoal_route"]
    if route["kind"] != kind:
        raise RuntimeError(f"expected a {kind} route, got {route}")
    per_token = route["observed"]["per_token_s"]
    return 1.0 / per_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-3b")
    parser.add_argument("--mix", default="q4_k_m", choices=("q4_k_m", "q8_0"))
    parser.add_argument("--backend", default="tvm", choices=("tvm", "numpy"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--share", type=float, default=0.45,
                        help="each member's budget as a share of the model's estimated need (default 0.45)")
    parser.add_argument("--files", type=Path, default=REPO / ".cache" / "shaped",
                        help="where the shaped GGUF is written once and kept")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' data dirs and logs")
    parser.add_argument("--standby", action="store_true",
                        help="leave [split] standby_spans on (members then fetch and build the spans a "
                             "re-plan would give them, in the background, while rounds run)")
    args = parser.parse_args(argv)

    args.files.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    path = shaped_file(args.shape, args.mix, args.files)
    print(f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB ({time.perf_counter() - started:.0f} s)")
    base = Path(tempfile.mkdtemp(prefix="shoal-big-split-"))
    # a stage's first open compiles its shard (minutes for a 3B span on 2 busy cores): wait for it
    split = {"open_timeout_s": 3600.0, "rebuild_timeout_s": 3700.0, "standby_spans": args.standby}
    mesh = BigMesh(base, path, share=args.share, backend=args.backend, context_tokens=256,
                   extra={"split": split})
    try:
        mesh.start()
        single = mesh.single()
        origin = mesh.nodes["origin"]
        print(f"budget per member: {args.share:.2f} x {mesh.need / 2**20:.0f} MiB; loadavg "
              f"{os.getloadavg()[0]:.1f}")
        warm = time.perf_counter()
        first_split = chat(origin, NAME, 2, PROMPT, logprobs=False)
        if "error" in first_split:
            raise RuntimeError(f"the first split request failed: {first_split['error']}")
        route = first_split["shoal_route"]
        print(f"first split request (fetch + build of each stage): {time.perf_counter() - warm:.1f} s, "
              f"stages {list(zip(route.get('peers', []), route.get('spans', []), strict=False))}")
        warm = time.perf_counter()
        chat(single, NAME, 2, PROMPT, logprobs=False)
        print(f"first single-node request (load): {time.perf_counter() - warm:.1f} s")

        ratios, split_rates, single_rates = [], [], []
        texts = set()
        timings: dict[str, list[float]] = {}
        for i in range(args.rounds):
            order = [("split", origin), ("local", single)]
            if i % 2:
                order.reverse()
            rates = {}
            for kind, node in order:
                reply = chat(node, NAME, args.tokens, PROMPT, logprobs=False)
                rates[kind] = decode_rate(reply, kind)
                for stage in reply["shoal_route"].get("stage_timing") or []:
                    if stage.get("calls"):  # per call: wall time at the origin, and the stage's own compute
                        key = f"{stage['peer'][:12]} {stage['layers']} ({stage['link']})"
                        timings.setdefault(key, []).append(stage["seconds"] / stage["calls"])
                        timings.setdefault(key + " compute", []).append(stage["compute_s"] / stage["calls"])
                texts.add((kind, reply["choices"][0]["message"]["content"]))
            split_rates.append(rates["split"])
            single_rates.append(rates["local"])
            ratios.append(rates["split"] / rates["local"])
            print(f"round {i + 1}: split {rates['split']:.2f} tok/s, single {rates['local']:.2f} tok/s, "
                  f"ratio {ratios[-1]:.3f}x (loadavg {os.getloadavg()[0]:.1f})")

        size = path.stat().st_size
        print(f"\n## {args.shape} {args.mix} ({size / 2**20:.0f} MiB), backend {args.backend}, "
              f"{args.tokens} tokens, {args.rounds} rounds")
        print(f"{'route':28} {'decode tok/s (median)':>22} {'vs single':>10}")
        print(f"{'single node (holds it all)':28} {statistics.median(single_rates):22.2f} {1.0:9.2f}x")
        print(f"{'3-stage split over budgets':28} {statistics.median(split_rates):22.2f} "
              f"{statistics.median(split_rates) / statistics.median(single_rates):9.2f}x")
        print(f"median of per-round ratios: {statistics.median(ratios):.3f}x (target >= 0.9x); "
              f"rounds {', '.join(f'{r:.3f}' for r in ratios)}")
        print(f"same text split vs single: {len({t for _, t in texts}) == 1}")
        if timings:
            print("\nsplit stages, ms per call (median over rounds; prefill and decode calls together):")
            for key, values in timings.items():
                print(f"  {statistics.median(values) * 1000:9.1f}  {key}")
        print(f"\n{'member':10} {'layers':>8} {'span+header MiB':>16} {'fetched MiB':>12} {'file MiB':>9} "
              "sources")
        for name in ("origin", "helper", "publisher"):
            fetched = [f for f in span_fetches(mesh.nodes[name]) if f["cid"] == mesh.cid and f["span"]]
            if not fetched:
                print(f"{name:10} {'-':>8} {'-':>16} {0:12.1f} {size / 2**20:9.0f} (holds the file)")
            for f in fetched:
                print(f"{name:10} {f['span']:>8} {f['span_bytes'] / 2**20:16.1f} "
                      f"{f['bytes_fetched'] / 2**20:12.1f} {size / 2**20:9.0f} {f['by_source']}")
    finally:
        mesh.stop()
        if args.keep:
            print(f"node data dirs and logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
