"""The constrained-decoding row of `bench/api_load.py`: decode tok/s through a real node with a `json_schema`
`response_format` against the same prompts unconstrained, and the grammar mask's time per token.

Each round runs every prompt once plain and once constrained (one client, greedy, streamed), the two
alternating which goes first from round to round; a round's ratio is constrained tok/s over plain tok/s
(decode speed: tokens after the first over the time from the first to the last), and the row's figure is the
median of the rounds' ratios (the machine's speed drifts between minutes; each round sees both under the
same load). TTFT is reported beside it (it holds the grammar's compile). The mask time per token is measured
on real outputs: the in-process engine answers each prompt constrained once, and its token ids are replayed
through a `GrammarMatcher` timing `apply` (the mask plus setting the forbidden logits) per token, as
`bench/grammar_mask.py` does for a random walk.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jsonschema
import numpy as np
from shoal.models.embedded import DEFAULT_MODEL_NAME
from shoal.models.grammar import Constraint, GrammarMatcher
from shoal.models.sampling import SamplingParams

from bench.api_load import stream_chat

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "points": {"type": "array", "items": {"type": "string", "maxLength": 80}, "maxItems": 6},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["title", "points", "rating"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "notes", "strict": True, "schema": SCHEMA}}
PROMPTS = [
    "Write notes about the sea as JSON.",
    "Explain what a CPU cache is, as JSON notes.",
    "List uses of copper as JSON notes.",
    "Describe a sunrise in the mountains as JSON notes.",
]


@dataclass
class Timed:
    """One streamed answer."""

    tokens: int = 0
    ttft: float | None = None
    decode_s: float = 0.0
    """From the first content chunk to the last."""
    text: str = ""
    finish: str | None = None
    error: str | None = None


@dataclass
class Round:
    plain: list[Timed] = field(default_factory=list)
    schema: list[Timed] = field(default_factory=list)

    @staticmethod
    def tok_s(runs: list[Timed]) -> float:
        seconds = sum(r.decode_s for r in runs)
        return sum(max(r.tokens - 1, 0) for r in runs) / seconds if seconds > 0 else float("nan")

    @property
    def ratio(self) -> float:
        return self.tok_s(self.schema) / self.tok_s(self.plain)


@dataclass
class ConstrainedResult:
    rounds: list[Round]
    mask_ms: list[float]
    valid: int
    finished: int
    """Constrained answers that ended by themselves (`stop`), not cut short by max_tokens."""
    documents: int
    max_tokens: int


async def http_once(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int,
                    constrained: bool) -> Timed:
    body: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": prompt}],
                            "temperature": 0, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = RESPONSE_FORMAT
    answer = await stream_chat(session, url, body)
    run = Timed(tokens=answer.tokens, text=answer.text, finish=answer.finish, error=answer.error)
    if answer.arrivals:
        run.ttft = answer.arrivals[0] - answer.started
        run.decode_s = answer.arrivals[-1] - answer.arrivals[0]
    return run


async def mask_times(served: Any, prompts: list[str], max_tokens: int
                     ) -> tuple[list[float], list[tuple[str, str | None]]]:
    """Per-token mask + apply times (ms) replayed over the engine's own constrained answers, and the
    answers (text, finish reason)."""
    import asyncio

    loop = asyncio.get_running_loop()
    constraint = Constraint.json_schema(SCHEMA)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, constraint=constraint)
    vocab = served.config.vocab_size
    times: list[float] = []
    texts: list[tuple[str, str | None]] = []
    for prompt in prompts:
        ids = await loop.run_in_executor(None, served.tokenizer.encode_chat,
                                         [{"role": "user", "content": prompt}])
        out: list[int] = []
        parts: list[str] = []
        finish = None
        async for event in served.engine.stream(ids, params):
            out.append(event.token_id)
            parts.append(event.text)
            finish = event.finish_reason or finish
        texts.append(("".join(parts), finish))
        matcher = GrammarMatcher(constraint, served.engine.tokenizer, vocab)
        logits = np.zeros(vocab, dtype=np.float32)
        for token in out:
            if token in served.engine.tokenizer.stop_token_ids:
                break
            t = time.perf_counter()
            matcher.apply(logits)
            times.append((time.perf_counter() - t) * 1e3)
            matcher.accept(token)
    return times, texts


async def constrained_row(served: Any, session: aiohttp.ClientSession, url: str, rounds: int,
                          max_tokens: int) -> ConstrainedResult:
    for constrained in (False, True):  # warm-up: the grammar tokenizer is built once per model
        await http_once(session, url, PROMPTS[0], 4, constrained)
    out = []
    for k in range(rounds):
        result = Round()
        for constrained in ((False, True) if k % 2 == 0 else (True, False)):
            for prompt in PROMPTS:
                run = await http_once(session, url, prompt, max_tokens, constrained)
                (result.schema if constrained else result.plain).append(run)
        out.append(result)
    masks, texts = await mask_times(served, PROMPTS, max_tokens)
    answers = texts + [(r.text, r.finish) for round_ in out for r in round_.schema]
    valid = finished = 0
    for text, finish in answers:
        if finish != "stop":
            continue  # cut short by max_tokens: a prefix of a valid document
        finished += 1
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return ConstrainedResult(out, masks, valid, finished, len(answers), max_tokens)


def report_constrained(result: ConstrainedResult) -> None:
    print(f"\nconstrained decoding through the node: json_schema response_format vs none, {len(PROMPTS)} "
          f"prompts x max_tokens {result.max_tokens} per round, greedy, 1 client; order alternates by round")
    print(f"{'round':>6}{'plain tok/s':>13}{'schema tok/s':>14}{'ratio':>8}{'TTFT plain':>12}"
          f"{'TTFT schema':>13}")
    for k, r in enumerate(result.rounds):
        ttft_p = statistics.median([x.ttft for x in r.plain if x.ttft is not None] or [float("nan")])
        ttft_s = statistics.median([x.ttft for x in r.schema if x.ttft is not None] or [float("nan")])
        print(f"{k:>6}{Round.tok_s(r.plain):>13.1f}{Round.tok_s(r.schema):>14.1f}{r.ratio:>8.3f}"
              f"{ttft_p * 1e3:>10.1f}ms{ttft_s * 1e3:>11.1f}ms")
    ratios = [r.ratio for r in result.rounds]
    errors = [x.error for r in result.rounds for x in (*r.plain, *r.schema) if x.error]
    print(f"median of per-round ratios (schema / plain decode tok/s): {statistics.median(ratios):.3f} "
          f"(target >= 0.9); errors: {len(errors)}")
    if result.mask_ms:
        plain_ms = 1e3 / statistics.median([Round.tok_s(r.plain) for r in result.rounds])
        median = statistics.median(result.mask_ms)
        print(f"grammar mask + apply per token (replayed over the engine's own constrained answers): median "
              f"{median:.3f} ms, p90 {np.percentile(result.mask_ms, 90):.3f} ms over {len(result.mask_ms)} "
              f"tokens = {median / plain_ms * 100:.1f}% of a plain token's {plain_ms:.1f} ms")
    print(f"constrained answers: {result.documents}, finished by themselves: {result.finished}, of which "
          f"parse and validate: {result.valid} (the others were cut short by max_tokens)")
    if errors:
        print(f"first error: {errors[0]}")
