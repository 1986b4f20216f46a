"""The residency rules as plain functions: which idle models make room (least recently used, never busy or
kept ones), `keep_alive` durations as Ollama spells them, the `[models]` keys, and the idle reaper's sweep."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from shoal.mesh.api.errors import ApiError
from shoal.mesh.api.keep_alive import FOREVER, parse_keep_alive
from shoal.mesh.node.config import ConfigError, load_config
from shoal.mesh.node.model_residency import (
    ACQUIRE_GRACE_S,
    LOADED,
    LOADING,
    IdleReaper,
    Resident,
    budget_message,
    estimate_need,
    pick_victims,
)
from shoal.models.errors import ModelFileError

MB = 1 << 20


def resident(name: str, need_mb: int, last_used: float, *, keep: float = 300.0, state: str = LOADED,
             holds: int = 0) -> Resident:
    return Resident(name, need_mb * MB, keep, state=state, holds=holds, last_used=last_used)


def busy(r: Resident) -> bool:
    return r.holds > 0


def test_room_comes_from_the_least_recently_used_idle_models() -> None:
    a, b, c = resident("a", 300, 1.0), resident("b", 300, 3.0), resident("c", 300, 2.0)
    assert pick_victims([a, b, c], 100 * MB, 1000 * MB, busy) == []  # 900 + 100 fits
    assert pick_victims([a, b, c], 300 * MB, 1000 * MB, busy) == [a]
    assert pick_victims([a, b, c], 600 * MB, 1000 * MB, busy) == [a, c]
    assert pick_victims([a, b, c], 1100 * MB, 1000 * MB, busy) is None  # never fits


def test_busy_kept_and_loading_models_are_never_chosen() -> None:
    serving = resident("serving", 300, 1.0, holds=1)
    kept = resident("kept", 300, 0.5, keep=FOREVER)
    loading = resident("loading", 300, 0.1, state=LOADING)
    idle = resident("idle", 300, 9.0)
    assert pick_victims([serving, kept, loading, idle], 300 * MB, 1200 * MB, busy) == [idle]
    assert pick_victims([serving, kept, loading, idle], 600 * MB, 1200 * MB, busy) is None
    message, retryable = budget_message("new", 600 * MB, 1200 * MB, [serving, kept, loading, idle], busy)
    assert retryable  # a model is serving / loading: waiting may make room
    assert "'serving' (300 MiB, serving requests)" in message and "'kept' (300 MiB, kept loaded)" in message
    assert "'loading' (300 MiB, loading)" in message and "memory_budget_mb" in message
    alone, retry = budget_message("huge", 2000 * MB, 1200 * MB, [], busy)
    assert not retry and "more than this node's whole memory budget of 1200 MiB" in alone


def test_an_acquire_counts_as_busy_until_a_hold_claims_it_or_the_grace_ends() -> None:
    r = resident("a", 10, 0.0)
    now = time.monotonic()
    r.note_acquired(now)
    assert r.pending(now) and r.last_used == now
    r.claim()
    assert not r.pending(now)
    r.note_acquired(now - ACQUIRE_GRACE_S - 1)
    assert not r.pending(now)


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (0, 0.0), ("0", 0.0), (30, 30.0), (2.5, 2.5), ("300", 300.0), ("5m", 300.0),
    ("1h30m", 5400.0), ("250ms", 0.25), ("1.5s", 1.5), (-1, FOREVER), ("-1", FOREVER), ("-5m", FOREVER),
    (10**12, FOREVER), ("inf", FOREVER),
])
def test_keep_alive_reads_ollama_durations(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "5x", "", "m", True, [5], {"s": 1}, "nan", "1" * 41])
def test_a_bad_keep_alive_is_a_400_naming_it(value: object) -> None:
    with pytest.raises(ApiError) as info:
        parse_keep_alive(value)
    assert info.value.status == 400 and info.value.param == "keep_alive"


def test_models_config_keys() -> None:
    config = load_config(environ={"SHOAL_MODELS_KEEP_ALIVE_S": "-1", "SHOAL_MODELS_MEMORY_BUDGET_MB": "2048"},
                         overrides={"data_dir": "/tmp/x"})
    assert config.models.keep_alive_s == -1 and config.models.memory_budget_mb == 2048
    assert config.models.keep_default_loaded is True
    defaults = load_config(environ={}, overrides={"data_dir": "/tmp/x"}).models
    assert defaults.memory_budget_mb is None and defaults.keep_alive_s == 300
    for bad in ({"memory_budget_mb": 1}, {"keep_alive_s": 10.0**9}, {"keep_alive_s": float("nan")}):
        with pytest.raises(ConfigError, match=r"memory_budget_mb|keep_alive_s"):
            load_config(environ={}, overrides={"data_dir": "/tmp/x", "models": bad})


def test_an_unreadable_file_is_a_model_file_error() -> None:
    with pytest.raises(ModelFileError, match="cannot read the model file"):
        estimate_need(Path("/nonexistent/model.gguf"), "tvm", cache_tokens=256, max_batch=8, context=None)


async def test_the_reaper_unloads_expired_idle_models_only() -> None:
    now = time.monotonic()
    expired = resident("expired", 10, now - 10, keep=5.0)
    fresh = resident("fresh", 10, now, keep=60.0)
    serving = resident("serving", 10, now - 100, keep=5.0, holds=1)
    kept = resident("kept", 10, now - 10**6, keep=FOREVER)
    unloaded: list[str] = []

    async def unload(name: str) -> bool:
        unloaded.append(name)
        return True

    reaper = IdleReaper(lambda: [expired, fresh, serving, kept], busy, unload)
    delay = await reaper.sweep()
    assert unloaded == ["expired"]
    assert delay is not None and delay <= 1.0  # the busy one is looked at again soon
    assert serving.last_used >= now  # its keep_alive runs from when it was last seen busy
