"""This node's speed for a model, measured as soon as the model loads (not after the first request ends).

A node that has just loaded a model knows nothing of its speed, and its peers see none in its advert; the
planner (`split.scheduler`) then cannot tell a phone from a laptop. The probe runs a fixed prompt (a
counting sequence: greedy decoding keeps counting, so it does not stop at an end token) through the model's
own engine — the same code path as a request, every step on the engine's executor thread, never on the
event loop:

1. one request alone: prefill tok/s = prompt tokens / time to the first token; decode tok/s = tokens after
   the first / the time they took;
2. two requests at once, then four (where the engine batches that many), then one alone again: the median
   decode step while all of them decode, over the median step alone (before and after, so that a drift in
   the machine's speed cancels), gives the step's cost with 2 and 4 requests running: `batch_steps` (step
   time with 1, 2, 3, 4 requests, relative to one alone; 3 interpolated) and `batch_cost` (the share of one
   request's step time a second running request adds: ~1 where batching gains nothing; less where a batched
   step reads the weights once). Both, because the cost need not grow in a line: the NumPy reference's
   matrix products cost about twice as much for 2 rows as for 1 (a matrix-vector product becomes a matrix
   product) and then little more for 4 — there a fourth request is nearly free where a second was not.
   Medians, because on a busy machine a few steps wait for another process and would move a mean.

Cost: 8 prefills of the prompt (72 tokens) and about 5 × `speed_probe_tokens` decode steps (a batch's step
counts once), about 3 s for SmolLM2 on one core (NumPy reference). The result goes into the router's
`Speeds` (advertised as `speed[model]`, `source: probe`); finished requests refine it afterwards.
`[split] speed_probe = false` turns it off (the planner then assumes an unmeasured device is no faster than
the one it is compared with).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from shoal.mesh.split.plan_inputs import MAX_BATCH_COST, Speeds
from shoal.mesh.split.ports import NodeModels
from shoal.models.errors import ModelError
from shoal.models.sampling import SamplingParams
from shoal.models.served import ServedModel

logger = logging.getLogger(__name__)

PROBE_TEXT = ", ".join(str(i) for i in range(1, 25)) + ","
"""The probe's prompt: greedy decoding continues the count (", 25, 26, ...") for as long as asked."""


BATCHED = 4
"""The most requests the probe runs at once (fewer where the engine batches fewer)."""


@dataclass(frozen=True)
class ProbeResult:
    decode_tok_s: float
    prefill_tok_s: float
    batch_cost: float | None
    """None when the two-request run gave too few shared steps to time."""
    batch_steps: tuple[float, ...] = ()
    """Step time with 1, 2, … requests decoding, relative to one alone (empty: too few shared steps)."""


async def _timed_stream(served: ServedModel, prompt: list[int], tokens: int) -> list[float]:
    """Arrival times (perf_counter) of each token of one greedy request, the start time first."""
    times = [time.perf_counter()]
    params = SamplingParams(max_tokens=tokens, temperature=0)
    async with contextlib.aclosing(served.engine.stream(prompt, params)) as events:
        async for _ in events:
            times.append(time.perf_counter())
    return times


def _gaps(times: list[float]) -> list[float]:
    return [y - x for x, y in itertools.pairwise(times)]


async def measure(served: ServedModel, tokens: int) -> ProbeResult | None:
    """Run the probe on `served`'s engine; None when the model stopped too early to time decoding."""
    prompt = await asyncio.to_thread(served.tokenizer.encode, PROBE_TEXT)
    alone = await _timed_stream(served, prompt, tokens)
    if len(alone) < 4:
        return None
    start, first, last = alone[0], alone[1], alone[-1]
    step_alone = (last - first) / (len(alone) - 2)
    if step_alone <= 0 or first <= start:
        return None
    pair = await asyncio.gather(*(_timed_stream(served, prompt, tokens) for _ in range(2)))
    many = min(BATCHED, getattr(served.engine, "max_batch", 2))
    # their prompts are prefilled one a turn while the first ones decode: `many` more tokens each keep
    # enough steps where all of them decode
    group = await asyncio.gather(*(_timed_stream(served, prompt, tokens + many) for _ in range(many))) \
        if many > 2 else []
    after = await _timed_stream(served, prompt, tokens)  # alone again: the machine's drift cancels
    # medians of the step gaps, alone (before and after) and shared: a step delayed by another process (a
    # busy machine) moves a mean, not a median
    typical_alone = statistics.median(_gaps(alone[1:]) + _gaps(after[1:]))
    two = _shared_step(pair, typical_alone)
    batch_cost = None if two is None else min(MAX_BATCH_COST, max(0.0, two - 1))
    steps: tuple[float, ...] = ()
    if two is not None:
        steps = batch_steps(two, _shared_step(group, typical_alone) if group else None, many)
    return ProbeResult(1 / step_alone, len(prompt) / (first - start), batch_cost, steps)


def _shared_step(streams: list[list[float]], typical_alone: float) -> float | None:
    """The median step while every stream decodes, over the median step alone; None with too few such
    steps (or no step alone to compare with)."""
    if typical_alone <= 0 or any(len(s) < 3 for s in streams):
        return None
    both_from, both_to = max(s[1] for s in streams), min(s[-1] for s in streams)
    shared = [t for t in streams[0][1:] if both_from <= t <= both_to]
    if len(shared) < 3:
        return None
    return statistics.median(_gaps(shared)) / typical_alone


def batch_steps(two: float, many: float | None, count: int) -> tuple[float, ...]:
    """Relative step times for 1..`count` requests from those measured with 2 and with `count` (None: 2
    only), interpolated in between; each at least the one before it, at most what `MAX_BATCH_COST` allows."""
    steps = [1.0, min(1 + MAX_BATCH_COST, max(1.0, two))]
    if many is not None and count > 2:
        last = min(1 + MAX_BATCH_COST * (count - 1), max(steps[1], many))
        for n in range(3, count + 1):
            steps.append(steps[1] + (last - steps[1]) * (n - 2) / (count - 2))
    return tuple(round(x, 3) for x in steps)


class SpeedProbe:
    """Probes each model after it loads, and again every `every_s` while the node is idle (one probe at a
    time). `poll()` is called periodically (the split service's advert loop); `stop()` cancels a probe."""

    def __init__(self, models: NodeModels, speeds: Speeds, tokens: int, *, busy: Callable[[], int],
                 on_done: Callable[[], None], every_s: float = 0.0) -> None:
        """`busy()` counts requests this node is running (a probe waits until it is idle: it would time
        them, not itself); `on_done()` runs after a result went into `speeds` (re-advertise); `every_s` > 0
        probes a loaded model again that long after its last probe (a device's speed changes: other work,
        heat, power saving), 0 only once per load."""
        self.models = models
        self.speeds = speeds
        self.tokens = tokens
        self.busy = busy
        self.on_done = on_done
        self.every_s = every_s
        self.probed: dict[str, float] = {}
        """Model name → when (monotonic) its last probe started."""
        self._task: asyncio.Task[None] | None = None

    def _due(self, name: str) -> bool:
        last = self.probed.get(name)
        if last is None:
            return not self.speeds.measured(name)  # finished requests measured it already
        return self.every_s > 0 and time.monotonic() - last >= self.every_s

    def poll(self) -> None:
        if self._task is not None and not self._task.done():
            return
        if self.busy() > 0:
            return
        for name in self.models.loaded_names():
            served = self.models.served(name)
            if served is None or not self._due(name):
                continue
            self.probed[name] = time.monotonic()
            self._task = asyncio.create_task(self._probe(served), name=f"speed-probe-{name}")
            return

    async def _probe(self, served: ServedModel) -> None:
        started = time.perf_counter()
        try:
            result = await measure(served, self.tokens)
        except asyncio.CancelledError:
            raise
        except (ModelError, ValueError, RuntimeError) as exc:  # unloaded, stopped, a full queue
            logger.warning("speed probe of %s failed: %s", served.name, exc)
            return
        except Exception:  # the task's boundary: a probe never takes the node down
            logger.exception("speed probe of %s failed", served.name)
            return
        if result is None:
            logger.warning("speed probe of %s: the model stopped too early to time", served.name)
            return
        self.speeds.probed(served.name, result.decode_tok_s, result.prefill_tok_s, result.batch_cost,
                           result.batch_steps)
        cost = "unknown" if result.batch_cost is None else f"{result.batch_cost:.2f}"
        logger.info("speed probe of %s in %.2f s: decode %.1f tok/s, prefill %.0f tok/s, batch cost %s, "
                    "steps %s", served.name, time.perf_counter() - started, result.decode_tok_s,
                    result.prefill_tok_s, cost, list(result.batch_steps) or "unknown")
        self.on_done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
