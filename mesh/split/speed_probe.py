"""This node's speed for a model, measured as soon as the model loads (not after the first request ends).

A node that has just loaded a model knows nothing of its speed, and its peers see none in its advert; the
planner (`split.scheduler`) then cannot tell a phone from a laptop. The probe runs a fixed prompt (a
counting sequence: greedy decoding keeps counting, so it does not stop at an end token) through the model's
own engine — the same code path as a request, every step on the engine's executor thread, never on the
event loop:

1. one request alone: prefill tok/s = prompt tokens / time to the first token; decode tok/s = tokens after
   the first / the time they took;
2. two requests at once, then one alone again: the median decode step while both decode, over the median
   step alone (before and after, so that a drift in the machine's speed cancels), gives
   `batch_cost` (the share of one request's step time a second running request adds: ~1 where batching
   gains nothing; less where a batched step reads the weights once). Medians, because on a busy machine a
   few steps wait for another process and would move a mean.

Cost: 4 × prompt (72 tokens) of prefill and 4 × `speed_probe_tokens` decode steps, about 1.5 s for SmolLM2
on one core (NumPy reference). The result goes into the router's `Speeds` (advertised as `speed[model]`,
`source: probe`); finished requests refine it afterwards. `[split] speed_probe = false` turns it off (the
planner then assumes an unmeasured device is no faster than the one it is compared with).
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


@dataclass(frozen=True)
class ProbeResult:
    decode_tok_s: float
    prefill_tok_s: float
    batch_cost: float | None
    """None when the two-request run gave too few shared steps to time."""


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
    a, b = await asyncio.gather(_timed_stream(served, prompt, tokens), _timed_stream(served, prompt, tokens))
    after = await _timed_stream(served, prompt, tokens)  # alone again: the machine's drift cancels
    both_from, both_to = max(a[1], b[1]), min(a[-1], b[-1])
    shared = [t for t in a[1:] if both_from <= t <= both_to]
    batch_cost = None
    if len(shared) >= 3:
        # medians of the step gaps, alone (before and after) and shared: a step delayed by another process
        # (a busy machine) moves a mean, not a median
        typical_alone = statistics.median(_gaps(alone[1:]) + _gaps(after[1:]))
        typical_pair = statistics.median(_gaps(shared))
        if typical_alone > 0:
            batch_cost = min(MAX_BATCH_COST, max(0.0, typical_pair / typical_alone - 1))
    return ProbeResult(1 / step_alone, len(prompt) / (first - start), batch_cost)


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
        self.speeds.probed(served.name, result.decode_tok_s, result.prefill_tok_s, result.batch_cost)
        logger.info("speed probe of %s in %.2f s: decode %.1f tok/s, prefill %.0f tok/s, batch cost %s",
                    served.name, time.perf_counter() - started, result.decode_tok_s, result.prefill_tok_s,
                    "unknown" if result.batch_cost is None else f"{result.batch_cost:.2f}")
        self.on_done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
