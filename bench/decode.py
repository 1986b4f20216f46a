"""Prefill and decode speed of shoal's compiled runtime, shoal's NumPy reference and llama.cpp, one table.

    python bench/decode.py [--target auto|llvm|cuda] [--quantization auto|q4_1|native|f32] [--rounds 3]
                           [--model FILE] [--context 4096] [--prompt-tokens 2000]

Each engine runs in its own subprocess (so peak RSS is its own): a ~200-token chat prompt is prefilled, then
128 greedy decode steps follow. `--rounds` rounds each run every engine once, alternating the order; a row
shows the medians of its runs, and its ratios are the median over rounds of the per-round ratio to
llama.cpp. llama.cpp (llama-cpp-python, n_threads = the core count, same GGUF) is included when importable.
The compiled engine's library is built (or found) in the compile cache before it is timed; the compile column
is the build time recorded in the cache manifest (`--fresh-compile` rebuilds into a temporary cache first).

`--context N` sizes every engine's KV cache for N positions (shoal: one sequence of N tokens; llama.cpp:
n_ctx = N) and, in the first round, fills it after the timed runs: a prompt of N − 8 tokens, then 4 decode
steps. The peak RSS of that process (VmHWM: weights, KV cache, runtime, and the GGUF pages mapped while
loading) is printed beside the issue's target, file size + 250 MB.

`--prompt-tokens N` makes the timed chat prompt about N tokens (default 200); a long one times a prefill of
several chunks (shoal's CPU chunk is 256 tokens: every chunk after the first attends over the cached pages).
Both engines' caches are sized to hold it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENGINES = ("shoal-compiled", "shoal-numpy", "llama.cpp")
PROMPT_TOKENS = 200
RSS_ALLOWANCE_MB = 250
"""Issue 16's memory target: peak RSS at a 4k context ≤ the GGUF's size + this."""
TOPIC = ("Explain, step by step and with examples, how a compiler turns a high level program into fast "
         "machine code for a small computer with two cores, covering parsing, optimisation, scheduling and "
         "memory. ")


def chat_prompt(tokenizer: Any, n_tokens: int = PROMPT_TOKENS) -> list[int]:
    """A rendered chat prompt (SmolLM's default system prompt, one user turn) of about `n_tokens` ids."""
    words = (TOPIC * max(20, n_tokens // 20)).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest user message whose prompt fits n_tokens
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode_chat([{"role": "user", "content": " ".join(words[:mid])}])) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return tokenizer.encode_chat([{"role": "user", "content": " ".join(words[:lo])}])


def _peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM where /proc has it (ru_maxrss survives exec on Linux, so
    it can report the parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _ShoalEngine:
    def __init__(self, stage: Any, vocab: int) -> None:
        self.stage = stage
        self.vocab = vocab
        self._seq = 0

    def run(self, prompt: list[int], steps: int) -> tuple[float, float, list[int]]:
        import numpy as np

        self._seq += 1
        seq = self._seq
        self.stage.add_sequence(seq)
        try:
            start = time.perf_counter()
            logits = self.stage.prefill(seq, np.asarray(prompt, dtype=np.int32))
            prefill_s = time.perf_counter() - start
            tokens = [int(np.argmax(logits))]
            start = time.perf_counter()
            for _ in range(steps):
                logits = self.stage.decode([seq], np.asarray(tokens[-1:], dtype=np.int32))
                tokens.append(int(np.argmax(logits[0])))
            decode_s = time.perf_counter() - start
        finally:
            self.stage.remove_sequence(seq)
        return prefill_s, decode_s, tokens


class _LlamaCppEngine:
    def __init__(self, model_path: Path, threads: int, context: int) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=context or 1024, n_batch=512, logits_all=False, verbose=False)
        self.vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        import numpy as np

        ctx = getattr(self.llm, "ctx", None) or self.llm._ctx.ctx
        ptr = self.llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.vocab,))))

    def run(self, prompt: list[int], steps: int) -> tuple[float, float, list[int]]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        prefill_s = time.perf_counter() - start
        tokens = [self._argmax()]
        start = time.perf_counter()
        for _ in range(steps):
            self.llm.eval(tokens[-1:])
            tokens.append(self._argmax())
        decode_s = time.perf_counter() - start
        return prefill_s, decode_s, tokens


def profile_decode(stage: Any, prompt: list[int], steps: int = 20) -> list[tuple[str, float, int]]:
    """Per-function time of the compiled decode step (VM instrumentation: each call timed from Python, so
    the absolute numbers carry ~1-2 µs of overhead per call). Returns (name, ms per step, calls per step)."""
    import numpy as np

    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    started: dict[str, float] = {}

    def instrument(_func: Any, name: str, before_run: bool, _ret: Any, *_args: Any) -> int:
        now = time.perf_counter()
        if before_run:
            started[name] = now
        else:
            totals[name] = totals.get(name, 0.0) + now - started.pop(name, now)
            counts[name] = counts.get(name, 0) + 1
        return 0

    seq = 10_000
    stage.add_sequence(seq)
    try:
        stage.prefill(seq, np.asarray(prompt, dtype=np.int32))
        stage.set_instrument(instrument)
        try:
            for _ in range(steps):
                stage.decode([seq], np.asarray([1], dtype=np.int32))
        finally:
            stage.set_instrument(None)
    finally:
        stage.remove_sequence(seq)
    rows = [(name, t / steps * 1e3, counts[name] // steps) for name, t in totals.items()]
    return sorted(rows, key=lambda r: -r[1])


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one engine in this process and return its measurements."""
    from shoal.models.embedded import embedded_model_path
    from shoal.models.gguf import GGUFModel
    from shoal.models.span import LayerSpan
    from shoal.models.targets import host_cores
    from shoal.models.tokenizer import Tokenizer

    model_path = Path(args.model) if args.model != "default" else embedded_model_path()
    gguf = GGUFModel.open(model_path)
    prompt = chat_prompt(Tokenizer.from_gguf(gguf), args.prompt_tokens)
    result: dict[str, Any] = {"engine": args.worker, "prompt_tokens": len(prompt), "compile_s": None}
    needed = len(prompt) + args.steps + 16  # positions the timed runs use (one sequence at a time)
    start = time.perf_counter()
    if args.worker == "shoal-compiled":
        from shoal.models.runtime import CompiledStage

        sizing = {"max_batch_size": 1, "max_total_tokens": args.context} if args.context else {}
        if args.prompt_tokens > PROMPT_TOKENS:
            sizing["max_total_tokens"] = max(args.context, needed)
        if args.prefill_chunk:
            sizing["prefill_chunk"] = args.prefill_chunk
        stage = CompiledStage.load(gguf, LayerSpan.whole(gguf.config.num_layers), target=args.target,
                                   quantization=args.quantization, **sizing)
        result["compile_s"] = json.loads(stage.shard.manifest.read_text()).get("compile_seconds")
        result["weight_bytes"] = sum(_nbytes(shape, dtype) for _, shape, dtype in stage.shard.params)
        result["device"] = stage.target.kind
        engine: Any = _ShoalEngine(stage, gguf.config.vocab_size)
    elif args.worker == "shoal-numpy":
        from shoal.models.reference import ReferenceStage

        engine = _ShoalEngine(ReferenceStage(gguf, LayerSpan.whole(gguf.config.num_layers)),
                              gguf.config.vocab_size)
    else:
        engine = _LlamaCppEngine(model_path, args.threads or host_cores(), max(args.context, needed)
                                 if args.prompt_tokens > PROMPT_TOKENS else args.context)
        result["weight_bytes"] = sum(gguf.tensor_info(n).size for n in gguf.tensor_names())
    gguf.close()  # the engines hold their own copies; drop the mapped file's pages
    result["load_s"] = time.perf_counter() - start
    engine.run(prompt[:16], 4)  # warm up
    prefills, decodes = [], []
    for _ in range(args.repeats):
        prefill_s, decode_s, tokens = engine.run(prompt, args.steps)
        prefills.append(len(prompt) / prefill_s)
        decodes.append(args.steps / decode_s)
    result.update(prefill_tps=statistics.median(prefills), decode_tps=statistics.median(decodes),
                  peak_rss_mb=_peak_rss_mb(), first_tokens=tokens[:8])
    if args.profile and args.worker == "shoal-compiled":
        result["profile"] = profile_decode(stage, prompt)
    if args.fill and args.context:
        long_prompt = (prompt * (args.context // len(prompt) + 1))[:args.context - 8]
        start = time.perf_counter()
        engine.run(long_prompt, 4)
        result.update(context_rss_mb=_peak_rss_mb(), fill_s=time.perf_counter() - start)
    return result


def _run_engine(engine: str, args: argparse.Namespace, fill: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", engine, "--target", args.target, "--model", args.model,
           "--quantization", args.quantization, "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--context", str(args.context), "--prompt-tokens", str(args.prompt_tokens)]
    if fill:
        cmd.append("--fill")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.profile:
        cmd.append("--profile")
    if args.prefill_chunk:
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"engine": engine, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    import numpy as np

    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s moved (read + write) by the best of `repeats` NumPy copies of `mib` MiB: a practical ceiling
    for streaming weights from memory (one thread)."""
    import numpy as np

    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def read_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s read by `threads` threads at once, each OR-reducing its share of a `mib` MiB buffer (NumPy's
    reductions release the GIL and stream at the vector width), best of `repeats`: what a decode that reads
    every weight once a token can reach on that many cores."""
    import threading

    import numpy as np

    words = np.ones(mib << 17, np.uint64)
    parts = np.array_split(words, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(part,)) for part in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return words.nbytes / best


def print_bandwidth(rows: list[dict[str, Any]], threads: int) -> None:
    """Each engine's decode weight stream (weight bytes × decode tok/s) as a share of `read_bandwidth` on the
    engines' thread count — the limit — and of `copy_bandwidth` (the figure earlier tables quote)."""
    limit, copy = read_bandwidth(threads), copy_bandwidth()
    print(f"\nmemory bandwidth limit (NumPy 512 MiB read, {threads} thread(s)): {limit / 1e9:.1f} GB/s; "
          f"a one-thread 256 MiB copy (read + write): {copy / 1e9:.1f} GB/s")
    for r in rows:
        if "error" not in r and r.get("weight_bytes"):
            stream = r["weight_bytes"] * r["decode_tps"]
            mib = r["weight_bytes"] / 2**20
            print(f"  {r['engine']:<16} decode streams {mib:.0f} MiB of weights a token: "
                  f"{stream / 1e9:.1f} GB/s = {100 * stream / limit:.0f}% of the limit "
                  f"({100 * stream / copy:.0f}% of the copy rate)")


def _llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def merge_rounds(rounds: list[dict[str, dict[str, Any]]], engines: list[str]) -> list[dict[str, Any]]:
    """One row per engine: medians of its rounds' speeds, and — the figure to quote — the median over rounds
    of its speed divided by llama.cpp's in the same round (this machine's speed drifts between minutes; a
    round runs every engine back to back, so the drift cancels in its ratios)."""
    rows = []
    for engine in engines:
        runs = [r[engine] for r in rounds if "error" not in r.get(engine, {"error": ""})]
        if not runs:
            rows.append(next(r[engine] for r in rounds if engine in r))
            continue
        row = dict(runs[-1])
        for key in ("prefill_tps", "decode_tps", "peak_rss_mb"):
            row[key] = statistics.median(run[key] for run in runs)
        filled = [run for run in runs if "context_rss_mb" in run]
        if filled:
            row["context_rss_mb"] = filled[0]["context_rss_mb"]
            row["fill_s"] = filled[0].get("fill_s")
        for kind in ("prefill", "decode"):
            ratios = [r[engine][f"{kind}_tps"] / r["llama.cpp"][f"{kind}_tps"] for r in rounds
                      if "error" not in r.get(engine, {"error": ""})
                      and "error" not in r.get("llama.cpp", {"error": ""})]
            row[f"{kind}_ratio"] = statistics.median(ratios) if ratios else None
            row[f"{kind}_ratios"] = ratios
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'engine':<16} {'prefill tok/s':>13} {'decode tok/s':>12} {'peak RSS MB':>11} {'compile s':>9} "
            f"{'prefill ×llama.cpp':>18} {'decode ×llama.cpp':>17}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:<16} failed: {r['error']}")
            continue
        print(f"{r['engine']:<16} {r['prefill_tps']:>13.1f} {r['decode_tps']:>12.1f} "
              f"{r['peak_rss_mb']:>11.0f} {_fmt(r.get('compile_s'), '9.1f'):>9} "
              f"{_fmt(r.get('prefill_ratio'), '17.2f'):>17}× {_fmt(r.get('decode_ratio'), '16.2f'):>16}×")
    for r in rows:
        if r.get("decode_ratios") and r["engine"] != "llama.cpp":
            spread = ", ".join(f"{x:.2f}" for x in r["decode_ratios"])
            print(f"  {r['engine']}: decode ×llama.cpp per round {spread}")


def print_context_rss(rows: list[dict[str, Any]], model_path: Path, context: int) -> None:
    """Each engine's peak RSS with `context` positions filled, beside file size + RSS_ALLOWANCE_MB (decimal
    MB here: VmHWM's MiB × 1.048576)."""
    file_mb = model_path.stat().st_size / 1e6
    target = file_mb + RSS_ALLOWANCE_MB
    print(f"\npeak RSS with the {context}-token context filled (target: file {file_mb:.0f} MB + "
          f"{RSS_ALLOWANCE_MB} = {target:.0f} MB)")
    for r in rows:
        if "context_rss_mb" in r:
            rss = r["context_rss_mb"] * 2**20 / 1e6
            verdict = "within" if rss <= target else "OVER"
            took = f"; the fill took {r['fill_s']:.0f} s" if r.get("fill_s") is not None else ""
            print(f"  {r['engine']:<16} {rss:7.0f} MB  {verdict} ({rss - file_mb:+.0f} MB beside the file"
                  f"{took})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="auto", choices=("auto", "llvm", "cuda"))
    parser.add_argument("--quantization", default="auto", choices=("auto", "q4_1", "native", "f32"))
    parser.add_argument("--model", default="default", help="GGUF path, or `default` (the embedded model)")
    parser.add_argument("--steps", type=int, default=128, help="greedy decode steps (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine and round (median)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each runs every engine once, alternating the order (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: core count)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated subset of " + ", ".join(ENGINES))
    parser.add_argument("--context", type=int, default=0,
                        help="size the KV cache for this many positions and, in round 1, fill it and report "
                             "peak RSS against file size + 250 MB (e.g. 4096)")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                        help=f"about how many tokens the timed chat prompt has (default {PROMPT_TOKENS})")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="shoal's prefill chunk in tokens (default: CompiledStage's for the target)")
    parser.add_argument("--fill", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fresh-compile", action="store_true", help="rebuild into a temporary compile cache")
    parser.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    parser.add_argument("--profile", action="store_true",
                        help="also print where a compiled decode step spends its time, per function")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.fresh_compile:
        os.environ["SHOAL_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="shoal-bench-compile-")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")
    if "llama.cpp" in engines and not _llama_cpp_available():
        print("llama.cpp: llama-cpp-python is not installed; skipped", file=sys.stderr)
        engines.remove("llama.cpp")
    rounds: list[dict[str, dict[str, Any]]] = []
    for number in range(1, args.rounds + 1):
        order = engines if number % 2 else engines[::-1]  # alternate who goes first
        round_rows = {}
        for engine in order:
            print(f"round {number}/{args.rounds}: {engine} ...", file=sys.stderr, flush=True)
            round_rows[engine] = _run_engine(engine, args, fill=number == 1 and engine != "shoal-numpy")
        rounds.append(round_rows)
    rows = merge_rounds(rounds, engines)
    print(f"\n{args.steps} greedy decode steps after a ~{args.prompt_tokens}-token chat prompt; "
          f"{args.rounds} rounds (engines alternated), median of {args.repeats} runs each; ratios: median of "
          f"per-round ratios; target {args.target}, quantization {args.quantization}; {os.cpu_count()} CPUs")
    print_table(rows)
    from shoal.models.targets import host_cores

    print_bandwidth(rows, args.threads or host_cores())
    if args.context:
        from shoal.models.embedded import embedded_model_path

        print_context_rss(rows, Path(args.model) if args.model != "default" else embedded_model_path(),
                          args.context)
    for row in rows:
        if row.get("profile"):
            print(f"\nper-function decode time ({row['engine']}, instrumented; top 15):")
            for name, ms, calls in row["profile"][:15]:
                print(f"  {name:<58} {ms:8.3f} ms/step  {calls:5d} calls/step")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
