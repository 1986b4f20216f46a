"""Partitioning a model's layers among pipeline stages: pure functions over layer counts, speeds and caps.

Used by `mesh.scheduler`, which scores both allocations for each candidate chain and keeps the cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shoal.models.span import LayerSpan


def spans_of(counts: Sequence[int]) -> list[LayerSpan]:
    """Contiguous spans from 0 holding `counts[i]` layers each."""
    spans, start = [], 0
    for n in counts:
        spans.append(LayerSpan(start, start + n))
        start += n
    return spans


def allocate_proportional(total: int, speeds: Sequence[float], caps: Sequence[int]) -> list[int] | None:
    """Layers per stage in proportion to `speeds`, each in [1, cap], summing to `total`; None if impossible.

    Water-filling: stages whose proportional share exceeds their cap are fixed at the cap and the rest is
    shared again among the others. Rounding uses largest remainders, so the result is deterministic.
    """
    k = len(speeds)
    if k == 0 or total < k or sum(caps) < total or min(caps) < 1:
        return None
    counts = [0] * k
    free = set(range(k))
    remaining = total
    while free:
        weight = sum(speeds[i] for i in free)
        share = {i: remaining * speeds[i] / weight for i in free}
        over = [i for i in free if share[i] > caps[i]]
        if not over:
            floors = {i: max(1, min(caps[i], math.floor(share[i]))) for i in free}
            left = remaining - sum(floors.values())
            order = sorted(free, key=lambda i: (-(share[i] - math.floor(share[i])), i))
            while left > 0:
                progressed = False
                for i in order:
                    if left and floors[i] < caps[i]:
                        floors[i] += 1
                        left -= 1
                        progressed = True
                if not progressed:
                    return None
            while left < 0:  # the 1-layer minimum overshot: take back from the largest
                i = max(free, key=lambda j: (floors[j], -j))
                if floors[i] <= 1:
                    return None
                floors[i] -= 1
                left += 1
            for i in free:
                counts[i] = floors[i]
            break
        for i in over:
            counts[i] = caps[i]
            remaining -= caps[i]
            free.discard(i)
        if remaining < len(free):  # the capped stages took layers the others need for their minimum of 1
            deficit = len(free) - remaining
            for i in sorted(over, key=lambda j: (-counts[j], j)):
                give = min(deficit, counts[i] - 1)
                counts[i] -= give
                remaining += give
                deficit -= give
            if deficit:
                return None
    ok = sum(counts) == total and all(1 <= c <= cap for c, cap in zip(counts, caps, strict=True))
    return counts if ok else None


def allocate_fastest_first(total: int, speeds: Sequence[float], caps: Sequence[int]) -> list[int] | None:
    """Each stage gets 1 layer, then the fastest stages fill up to their caps; None if impossible."""
    k = len(speeds)
    if k == 0 or total < k or sum(caps) < total or min(caps) < 1:
        return None
    counts = [1] * k
    left = total - k
    for i in sorted(range(k), key=lambda j: (-speeds[j], j)):
        take = min(left, caps[i] - 1)
        counts[i] += take
        left -= take
    return counts if left == 0 else None


def allocate_around(total: int, speeds: Sequence[float], caps: Sequence[int],
                    pins: Sequence[LayerSpan | None]) -> list[int] | None:
    """Layers per stage where each pinned stage takes exactly its span (whatever its cap: a span its device
    holds loaded needs no new memory) and the stages between pins share the gaps in proportion to speed under
    their caps (`allocate_proportional`); None when the pins do not fit that order (overlapping, out of
    order, or a gap its stages cannot fill)."""
    k = len(speeds)
    counts = [0] * k
    start = i = 0
    while i < k:
        pin = pins[i]
        if pin is not None:
            if pin.start != start:
                return None
            counts[i], start, i = len(pin), pin.stop, i + 1
            continue
        j = i
        while j < k and pins[j] is None:
            j += 1
        end = total if j == k else pins[j].start  # type: ignore[union-attr]
        gap = allocate_proportional(end - start, speeds[i:j], caps[i:j]) if end > start else None
        if gap is None:
            return None
        counts[i:j] = gap
        start, i = end, j
    return counts if start == total else None
