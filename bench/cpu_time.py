"""Prefill and decode speed as process CPU time with one thread in each engine (shoal's compiled native build
with TVM_NUM_THREADS=1, llama.cpp with n_threads=1): a ratio that survives other processes' load on a shared
machine, where bench/decode.py's wall-clock numbers do not. Not a substitute for a quiet two-thread run.

    python bench/cpu_time.py FILE.gguf [--steps 64] [--quantization native] [--rounds 3]

Each engine runs in its own subprocess: a ~200-token chat prompt is prefilled, then `--steps` greedy decode
steps; the median of 3 runs (after a warm-up run) is that engine's tok/s of CPU time in a round. Each of
`--rounds` rounds runs both engines, alternating which goes first; the ratios printed are the medians of the
per-round ratios (other processes' memory traffic still moves CPU time by ±15% from minute to minute).
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _measure(path: str, engine: str, steps: int, quantization: str) -> dict[str, float]:
    import numpy as np
    from shoal.models.gguf import GGUFModel
    from shoal.models.tokenizer import Tokenizer

    from bench.decode import chat_prompt

    model = GGUFModel.open(path)
    prompt = chat_prompt(Tokenizer.from_gguf(model))
    if engine == "shoal":
        import tvm  # noqa: F401  (compile in-process if the library is not cached)
        from shoal.models.runtime import CompiledStage
        from shoal.models.span import LayerSpan

        stage = CompiledStage.load(model, LayerSpan(0, model.config.num_layers), quantization=quantization)

        def run(seq: int) -> tuple[float, float]:
            stage.add_sequence(seq)
            t0 = time.process_time()
            token = int(np.argmax(stage.prefill(seq, np.array(prompt, np.int32))))
            t1 = time.process_time()
            for _ in range(steps):
                token = int(np.argmax(stage.decode([seq], np.array([token], np.int32))[0]))
            t2 = time.process_time()
            stage.remove_sequence(seq)
            return t1 - t0, t2 - t1
    else:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=1, n_threads_batch=1,
                              verbose=False)

        def run(seq: int) -> tuple[float, float]:
            del seq
            llm.reset()
            t0 = time.process_time()
            llm.eval(prompt)
            t1 = time.process_time()
            for _ in range(steps):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            t2 = time.process_time()
            return t1 - t0, t2 - t1
    run(0)
    times = [run(i + 1) for i in range(3)]
    return {"prefill_tps": len(prompt) / statistics.median(t[0] for t in times),
            "decode_tps": steps / statistics.median(t[1] for t in times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--quantization", default="native")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, engines alternated (default 3)")
    parser.add_argument("--worker", choices=("shoal", "llama.cpp"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_measure(args.model, args.worker, args.steps, args.quantization)))
        return 0
    env = dict(os.environ, TVM_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    engines = ("shoal", "llama.cpp")
    rounds: list[dict[str, dict[str, float]]] = []
    for number in range(args.rounds):
        rows = {}
        for engine in engines if number % 2 == 0 else engines[::-1]:
            proc = subprocess.run([sys.executable, __file__, args.model, "--steps", str(args.steps),
                                   "--quantization", args.quantization, "--worker", engine],
                                  capture_output=True, text=True, env=env, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                print(f"{engine}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            rows[engine] = json.loads(lines[-1])
            r = rows[engine]
            print(f"round {number + 1} {engine:<10} prefill {r['prefill_tps']:7.1f} tok/s-cpu   "
                  f"decode {r['decode_tps']:6.1f} tok/s-cpu", flush=True)
        rounds.append(rows)
    full = [r for r in rounds if len(r) == 2]
    if full:
        def per_round(kind: str) -> list[float]:
            return [r["shoal"][f"{kind}_tps"] / r["llama.cpp"][f"{kind}_tps"] for r in full]

        ratio = {kind: statistics.median(per_round(kind)) for kind in ("prefill", "decode")}
        med = {(e, kind): statistics.median(r[e][f"{kind}_tps"] for r in full)
               for e in engines for kind in ("prefill", "decode")}
        for e in engines:
            print(f"{e:<10} prefill {med[e, 'prefill']:7.1f} tok/s-cpu   decode {med[e, 'decode']:6.1f} "
                  f"tok/s-cpu (medians of {len(full)} rounds)")
        print(f"shoal / llama.cpp: prefill {ratio['prefill']:.2f}×, decode {ratio['decode']:.2f}× (median of "
              f"per-round ratios; decode per round: "
              + ", ".join(f"{x:.2f}" for x in per_round("decode")) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
