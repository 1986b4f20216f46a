"""The speed probe on a real engine (the node's ModelManager, NumPy backend, the embedded model): it measures
decode and prefill tok/s and the batch cost once per loaded model (again when due), waits while the node is
busy, and the numbers land in `Speeds` as the advert carries them."""

from __future__ import annotations

import asyncio

import pytest
from shoal.mesh.events import EventBus
from shoal.mesh.node.model_manager import ModelManager
from shoal.mesh.split.plan_inputs import MAX_BATCH_COST, Speeds
from shoal.mesh.split.speed_probe import PROBE_TEXT, SpeedProbe, measure
from shoal.models.embedded import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.timeout(300)


async def test_the_probe_measures_a_loaded_model_once() -> None:
    manager = ModelManager(EventBus(), backend="numpy", max_batch=4)
    manager.add_embedded()
    speeds = Speeds()
    done = asyncio.Event()
    busy = [1]
    probe = SpeedProbe(manager, speeds, 6, busy=lambda: busy[0], on_done=done.set)
    try:
        probe.poll()  # nothing loaded yet
        served = await manager.load(DEFAULT_MODEL_NAME)
        assert len(served.tokenizer.encode(PROBE_TEXT)) >= 48  # a prompt long enough to time prefill
        probe.poll()  # the node is busy: the probe waits
        assert not probe.probed and not speeds.measured(DEFAULT_MODEL_NAME)
        busy[0] = 0
        probe.poll()
        await asyncio.wait_for(done.wait(), 240)
        entry = speeds.by_model[DEFAULT_MODEL_NAME]
        assert entry["source"] == "probe" and entry["decode_tok_s"] > 0 and entry["prefill_tok_s"] > 0
        assert 0 <= entry.get("batch_cost", 0) <= MAX_BATCH_COST
        steps = entry.get("batch_steps", [])  # 1, 2, 3 and 4 at once (the engine batches 4)
        assert len(steps) in (0, 4) and steps == sorted(steps) and all(x >= 1 for x in steps), steps
        assert served.engine.active_count == 0 and served.engine.queue_depth == 0  # its requests ended
        done.clear()
        probe.poll()  # once per model: no second probe
        assert probe._task is None or probe._task.done()
        assert not done.is_set()
        probe.every_s = 1e-6  # `[split] speed_probe_every_min`: probed again once it is due, when idle
        probe.poll()
        await asyncio.wait_for(done.wait(), 240)
        assert speeds.by_model[DEFAULT_MODEL_NAME]["source"] == "probe"
        again = await measure(served, 3)  # the measurement itself, directly
        assert again is not None and again.decode_tok_s > 0
    finally:
        await probe.stop()
        await manager.stop()
