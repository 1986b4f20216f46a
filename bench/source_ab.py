"""One GGUF built from two source trees, timed against each other: "before" (a tree holding another
revision's `shoal/models`, put first on PYTHONPATH) and "after" (this checkout). For a kernel change, where
the peer to beat is the build without it.

    git archive REV models | tar -x -C /tmp/old/src && ln -s /tmp/old/src/models /tmp/old/path/shoal/models
    python bench/source_ab.py FILE.gguf --before /tmp/old/path [--threads 1 2] [--rounds 5] [--steps 64]
    python bench/source_ab.py FILE.gguf --before /tmp/old/path --workspace

Each tree's build runs in its own runtime-only subprocess (as `shoal serve` runs it; a missing library is
compiled first, in a child, into the shared compile cache — the trees' source hashes differ, so each has its
own entry). Speed: a ~200-token chat prompt (bench/decode.py's) is prefilled, then `--steps` greedy decode
steps; after a warm-up, the median of 3 runs per process, as wall time and as process CPU time (all threads;
with 2 threads that includes the pool's spinning). Every round runs both trees with `TVM_NUM_THREADS` = each
`--threads` value, alternating which goes first; the ratio printed is after/before in speed (> 1: after is
faster), the median of the per-round ratios, with the rounds' range.

`--workspace`: VmRSS of the process just before and just after one prefill of `--prefill-tokens` (512, a
whole prefill chunk) into an empty cache, and the growth of VmHWM: what one chunk's activations (the VM's
pooled workspace, which stays for same-length chunks) and its KV pages cost, per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TREES = ("before", "after")
METRICS = ("prefill_wall", "prefill_cpu", "decode_wall", "decode_cpu")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _worker(path: str, steps: int, quantization: str, workspace_tokens: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import numpy as np
    from shoal.models.gguf import GGUFModel
    from shoal.models.runtime import CompiledStage
    from shoal.models.span import LayerSpan
    from shoal.models.tokenizer import Tokenizer

    from bench.decode import chat_prompt

    model = GGUFModel.open(path)
    prompt = chat_prompt(Tokenizer.from_gguf(model))
    stage = CompiledStage.load(model, LayerSpan.whole(model.config.num_layers), quantization=quantization)
    result: dict[str, Any] = {"source": str(Path(sys.modules["shoal.models"].__path__[0]).resolve())}
    if workspace_tokens:
        ids = (np.arange(workspace_tokens) * 7919 % 1000 + 100).astype(np.int32)
        stage.add_sequence(0)
        stage.prefill(0, ids[:16])  # first call's one-time costs (VM, code pages) outside the window
        stage.remove_sequence(0)
        stage.add_sequence(1)
        before, hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
        stage.prefill(1, ids)
        after = _status_kib("VmRSS")
        result.update(rss_before_mib=before / 1024, rss_growth_mib=(after - before) / 1024,
                      hwm_growth_mib=(_status_kib("VmHWM") - max(hwm, before)) / 1024)
        stage.close()
        return result

    def run(seq: int, tokens: list[int], count: int) -> tuple[float, float, float, float]:
        stage.add_sequence(seq)
        w0, c0 = time.perf_counter(), time.process_time()
        token = int(np.argmax(stage.prefill(seq, np.array(tokens, np.int32))))
        w1, c1 = time.perf_counter(), time.process_time()
        for _ in range(count):
            token = int(np.argmax(stage.decode([seq], np.array([token], np.int32))[0]))
        w2, c2 = time.perf_counter(), time.process_time()
        stage.remove_sequence(seq)
        return w1 - w0, c1 - c0, w2 - w1, c2 - c1

    run(0, prompt, 4)  # warm-up (same prompt length: one workspace)
    times = [run(i + 1, prompt, steps) for i in range(3)]
    stage.close()
    med = [statistics.median(t[i] for t in times) for i in range(4)]
    n = len(prompt)
    result.update(prompt_tokens=n, prefill_wall=n / med[0], prefill_cpu=n / med[1],
                  decode_wall=steps / med[2], decode_cpu=steps / med[3])
    return result


def _spawn(args: argparse.Namespace, tree: str, threads: int) -> dict[str, Any] | None:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    if tree == "before":
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.before).resolve()), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, args.model, "--worker", "--steps", str(args.steps),
           "--quantization", args.quantization]
    if args.workspace:
        cmd += ["--workspace", "--prefill-tokens", str(args.prefill_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        print(f"{tree}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
        return None
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--before", help="a folder holding shoal/models of the other revision")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--quantization", default="native")
    parser.add_argument("--workspace", action="store_true", help="measure one prefill chunk's RSS instead")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.model, args.steps, args.quantization,
                                 args.prefill_tokens if args.workspace else 0)))
        return 0
    if not args.before or not (Path(args.before) / "shoal" / "models").is_dir():
        parser.error("--before must be a folder holding shoal/models")
    if args.workspace:
        for number in range(args.rounds):
            for tree in TREES if number % 2 == 0 else TREES[::-1]:
                r = _spawn(args, tree, args.threads[0])
                if r:
                    print(f"round {number + 1} {tree:<6} RSS before {r['rss_before_mib']:6.1f} MiB, "
                          f"+{r['rss_growth_mib']:5.1f} MiB after a {args.prefill_tokens}-token prefill "
                          f"(VmHWM +{r['hwm_growth_mib']:5.1f}) [{r['source']}]", flush=True)
        return 0
    for threads in args.threads:
        rounds: list[dict[str, dict[str, Any]]] = []
        for number in range(args.rounds):
            rows = {}
            for tree in TREES if number % 2 == 0 else TREES[::-1]:
                r = _spawn(args, tree, threads)
                if r is None:
                    continue
                rows[tree] = r
                print(f"{threads}T round {number + 1} {tree:<6} prefill {r['prefill_wall']:7.1f} tok/s wall "
                      f"{r['prefill_cpu']:7.1f} cpu   decode {r['decode_wall']:6.1f} tok/s wall "
                      f"{r['decode_cpu']:6.1f} cpu  (load {os.getloadavg()[0]:.1f})", flush=True)
            rounds.append(rows)
        full = [r for r in rounds if len(r) == 2]
        if not full:
            continue
        print(f"\n{threads} thread(s), {len(full)} rounds: after/before speed (median of per-round ratios, "
              "range)")
        print(f"{'metric':<14} {'before':>9} {'after':>9} {'ratio':>7}  range")
        for metric in METRICS:
            ratios = [r["after"][metric] / r["before"][metric] for r in full]
            med = {t: statistics.median(r[t][metric] for r in full) for t in TREES}
            print(f"{metric:<14} {med['before']:9.1f} {med['after']:9.1f} {statistics.median(ratios):6.2f}x  "
                  f"{min(ratios):.2f}-{max(ratios):.2f}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
