"""Load on the OpenAI endpoint: 1, 8 and 32 concurrent streaming clients against a real `shoal node`, and the
same load on the `Engine` called directly in this process, in one run on one machine.

    python bench/api_load.py [--backend numpy|tvm] [--max-tokens 32] [--levels 1,8,32] [--api URL]
                             [--long-clients 8] [--constrained-rounds 5] [--constrained-only]

For each level: aggregate completion tok/s, TTFT p50/p99, per-token latency p50/p99, errors; then the HTTP
overhead (node minus direct) of TTFT and per-token latency, and the aggregate speed-up over one client.
Last, the long row: `--long-clients` chats asking for long stories at once, without `max_tokens` (the node's
`[models] default_max_tokens` applies; KV admission queues what does not fit): all must complete.
Then the constrained row (`bench/api_constrained.py`): decode tok/s with a `json_schema` response_format over
the same prompts unconstrained, alternated round by round, the median of per-round ratios, and the grammar
mask's time per token (`--constrained-only` runs just that row).
Both are loaded at once but never run at the same time: each level runs on the engine, then through the
node; then alternating one-token requests measure the TTFT overhead pair by pair.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Idle OpenBLAS threads spin: with two model processes on one machine they would steal each other's cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from shoal.mesh.events import EventBus
from shoal.mesh.node.model_manager import ModelManager
from shoal.models.embedded import DEFAULT_MODEL_NAME
from shoal.models.sampling import SamplingParams

from tests.nodes import NodeProcess

LONG_PROMPT = "Write a long, detailed story about a lighthouse keeper, chapter {i}, with many characters."
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is.",
    "List three uses of copper.",
    "Describe a sunrise in the mountains.",
]


@dataclass
class Run:
    """One client's request."""

    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None
    finish: str | None = None


@dataclass
class Level:
    clients: int
    wall: float
    runs: list[Run]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.error is not None for r in self.runs)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0

    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.runs if r.ttft is not None]

    def gaps(self) -> list[float]:
        return [g for r in self.runs for g in r.gaps]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


async def run_level(clients: int, one: Callable[[int], Awaitable[Run]]) -> Level:
    start = time.perf_counter()
    runs = await asyncio.gather(*(one(i) for i in range(clients)))
    return Level(clients, time.perf_counter() - start, list(runs))


# --- direct: the Engine in this process ------------------------------------------------------------------

OneRequest = Callable[[int, int], Awaitable[Run]]
"""`one(i, max_tokens)`: run request number `i` and time it."""


def direct_client(served: Any) -> OneRequest:
    loop = asyncio.get_running_loop()

    async def one(i: int, max_tokens: int) -> Run:
        run = Run()
        t0 = time.perf_counter()
        last = t0
        try:
            ids = await loop.run_in_executor(None, served.tokenizer.encode_chat, messages(i))
            params = SamplingParams(max_tokens=max_tokens, temperature=0)
            async for event in served.engine.stream(ids, params):
                now = time.perf_counter()
                if run.ttft is None:
                    run.ttft = now - t0
                else:
                    run.gaps.append(now - last)
                last = now
                run.tokens = event.completion_tokens
        except Exception as exc:  # report, keep benchmarking
            run.error = repr(exc)
        return run

    return one


# --- http: a real node ------------------------------------------------------------------------------------


@dataclass
class StreamedChat:
    """One streamed chat completion as a client saw it."""

    started: float
    """`time.perf_counter()` when the request was sent."""
    arrivals: list[float] = field(default_factory=list)
    """When each chunk with text arrived."""
    text: str = ""
    tokens: int = 0
    """`usage.completion_tokens` (the request asks for usage)."""
    finish: str | None = None
    error: str | None = None


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> StreamedChat:
    """POST a streamed chat completion (`body` sets `stream`) and read its SSE chunks as they arrive."""
    answer = StreamedChat(time.perf_counter())
    parts: list[str] = []
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            if response.status != 200:
                answer.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return answer
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = orjson.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                    answer.finish = chunk["choices"][0]["finish_reason"]
                if "error" in chunk:
                    answer.error = chunk["error"].get("message")
                elif chunk.get("usage"):
                    answer.tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    answer.arrivals.append(time.perf_counter())
                    parts.append(chunk["choices"][0]["delta"]["content"])
    except (aiohttp.ClientError, TimeoutError) as exc:
        answer.error = repr(exc)
    answer.text = "".join(parts)
    return answer


def http_client(session: aiohttp.ClientSession, url: str, long: bool = False) -> OneRequest:
    """`one(i, max_tokens)` through the node; `long`: a long-story prompt, and max_tokens 0 omits it."""

    async def one(i: int, max_tokens: int) -> Run:
        run = Run()
        content = LONG_PROMPT.format(i=i) if long else PROMPTS[i % len(PROMPTS)]
        body: dict[str, Any] = {
            "model": DEFAULT_MODEL_NAME,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if max_tokens:
            body["max_tokens"] = max_tokens
        answer = await stream_chat(session, url, body)
        run.error, run.finish, run.tokens = answer.error, answer.finish, answer.tokens
        if answer.arrivals:
            run.ttft = answer.arrivals[0] - answer.started
            run.gaps = [b - a for a, b in zip(answer.arrivals, answer.arrivals[1:], strict=False)]
        return run

    return one


async def interleaved_levels(
    direct: OneRequest, http: OneRequest, max_tokens: int, levels: list[int]
) -> tuple[list[Level], list[Level]]:
    """Each level runs on the engine, then through the node, before the next level: slow drifts in the
    machine's background load hit both paths alike."""
    for one in (direct, http):  # warm-up
        await one(0, max_tokens)
    direct_levels, http_levels = [], []
    for n in levels:
        direct_levels.append(await run_level(n, lambda i: direct(i, max_tokens)))
        http_levels.append(await run_level(n, lambda i: http(i, max_tokens)))
    return direct_levels, http_levels


async def paired_ttft(direct: OneRequest, http: OneRequest, pairs: int) -> list[float]:
    """TTFT(http) - TTFT(direct) for alternating one-token requests: background load hits both alike."""
    diffs = []
    for k in range(pairs):
        d, h = await direct(k, 1), await http(k, 1)
        if d.ttft is not None and h.ttft is not None:
            diffs.append(h.ttft - d.ttft)
    return diffs


async def start_node(backend: str) -> NodeProcess:
    """A `shoal node` started as users do (`tests.nodes`: a config file), ready once its model is loaded."""
    node = NodeProcess("bench", Path(tempfile.mkdtemp(prefix="shoal-bench-")) / "node",
                       {"models": {"backend": backend}}).launch()
    try:
        return await asyncio.to_thread(node.wait_ready, 900, lambda health: bool(health["models"]))
    except RuntimeError as exc:
        node.kill()
        raise SystemExit(f"shoal node did not become ready: {exc}") from None


# --- report ----------------------------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value * 1000:8.1f}"


def report(direct: list[Level], http: list[Level], backend: str, max_tokens: int,
           long: Level | None = None) -> None:
    print(f"\nshoal API load: backend={backend}, max_tokens={max_tokens}, greedy, {os.cpu_count()} CPUs")
    header = (
        f"{'path':<7}{'clients':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'tok p50':>9}"
        f"{'tok p99':>9}{'errors':>8}{'x1 client':>10}"
    )
    print(header)
    print("-" * len(header))
    for label, levels in (("direct", direct), ("http", http)):
        base = levels[0].tok_s if levels else 0
        for lv in levels:
            print(
                f"{label:<7}{lv.clients:>8}{lv.tok_s:>9.1f}{ms(pct(lv.ttfts(), 50)):>10}"
                f"{ms(pct(lv.ttfts(), 99)):>10}{ms(pct(lv.gaps(), 50)):>9}{ms(pct(lv.gaps(), 99)):>9}"
                f"{lv.errors:>8}{lv.tok_s / base if base else float('nan'):>10.2f}"
            )
    print("\nHTTP overhead (node - direct), ms:")
    print(f"{'clients':>8}{'TTFT p50':>10}{'tok p50':>9}{'tok/s ratio':>13}")
    for d, h in zip(direct, http, strict=True):
        ttft = pct(h.ttfts(), 50) - pct(d.ttfts(), 50)
        gap = pct(h.gaps(), 50) - pct(d.gaps(), 50)
        ratio = h.tok_s / d.tok_s if d.tok_s else float("nan")
        print(f"{d.clients:>8}{ms(ttft):>10}{ms(gap):>9}{ratio:>13.2f}")
    if long is not None:
        finishes = sorted({r.finish or "-" for r in long.runs})
        done = sum(r.error is None and r.finish is not None for r in long.runs)
        print(f"\nlong generations through the node, no max_tokens: {long.clients} clients at once")
        print(f"{'clients':>8}{'complete':>9}{'errors':>8}{'tokens':>8}{'wall s':>8}{'tok/s':>8}"
              f"{'TTFT p50':>10}{'TTFT max':>10}  finish")
        print(f"{long.clients:>8}{done:>9}{long.errors:>8}{long.tokens:>8}{long.wall:>8.1f}{long.tok_s:>8.1f}"
              f"{ms(pct(long.ttfts(), 50)):>10}{ms(max(long.ttfts(), default=float('nan'))):>10}"
              f"  {','.join(finishes)}")
    errors = [r.error for lv in (*direct, *http, *([long] if long else [])) for r in lv.runs if r.error]
    if errors:
        print(f"\nfirst error: {errors[0]}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="numpy", choices=("numpy", "tvm"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument(
        "--pairs", type=int, default=20, help="alternating 1-token requests for TTFT overhead"
    )
    parser.add_argument("--api", help="use this running node instead of starting one")
    parser.add_argument("--long-clients", type=int, default=8,
                        help="clients of the long-generation row (no max_tokens); 0 skips it")
    parser.add_argument("--constrained-rounds", type=int, default=5,
                        help="rounds of the constrained-decoding row (json_schema vs none); 0 skips it")
    parser.add_argument("--constrained-only", action="store_true", help="run only the constrained row")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    manager = ModelManager(EventBus(), backend=args.backend)
    manager.add_embedded()
    served = await manager.load(DEFAULT_MODEL_NAME)
    proc = None
    try:
        direct_one = direct_client(served)
        url = args.api
        if url is None:
            proc = await start_node(args.backend)
            url = proc.url
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            http_one = http_client(session, url.rstrip("/"))
            direct: list[Level] = []
            http: list[Level] = []
            diffs: list[float] = []
            long = None
            if not args.constrained_only:
                direct, http = await interleaved_levels(direct_one, http_one, args.max_tokens, levels)
                diffs = await paired_ttft(direct_one, http_one, args.pairs)
                if args.long_clients:
                    long_one = http_client(session, url.rstrip("/"), long=True)
                    long = await run_level(args.long_clients, lambda i: long_one(i, 0))
            constrained = None
            if args.constrained_rounds or args.constrained_only:
                from bench.api_constrained import constrained_row

                constrained = await constrained_row(served, session, url.rstrip("/"),
                                                    args.constrained_rounds or 5, args.max_tokens)
    finally:
        await manager.stop()
        if proc is not None:
            await asyncio.to_thread(proc.stop, signal.SIGTERM, 60)
    if not args.constrained_only:
        report(direct, http, args.backend, args.max_tokens, long)
    if constrained is not None:
        from bench.api_constrained import report_constrained

        report_constrained(constrained)
    if diffs:
        print(
            f"\nTTFT overhead, {len(diffs)} alternating 1-token pairs (http - direct): "
            f"median {statistics.median(diffs) * 1000:.1f} ms, p10 {pct(diffs, 10) * 1000:.1f} ms, "
            f"p90 {pct(diffs, 90) * 1000:.1f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
