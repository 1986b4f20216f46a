"""The model manager's catalog: the embedded model, models the IPFS store holds, lookups by name and CID."""

from __future__ import annotations

from typing import Any

import pytest
from shoal.mesh.events import EventBus
from shoal.mesh.node.model_manager import ModelManager, ModelNotFoundError
from shoal.models.embedded import DEFAULT_MODEL_NAME, embedded_model_path

CID = "bafybeifvmoiokowzsdfjoiosxsk3t5p42iq6lajhmfld5v22b3osnrzmj4"


def catalog_entries() -> list[dict[str, Any]]:
    path = str(embedded_model_path())
    return [
        {"cid": CID, "names": ["pulled-model"], "size": 123, "pinned": True, "complete": True, "path": path},
        {"cid": "bafyincomplete", "names": ["half"], "size": None, "pinned": True, "complete": False,
         "path": None},
    ]


async def test_catalog_models_become_servable_by_name_and_cid() -> None:
    manager = ModelManager(EventBus(), backend="numpy", catalog=catalog_entries)
    manager.add_embedded()
    ids = [m["id"] for m in manager.list_models()]
    assert ids == [DEFAULT_MODEL_NAME]  # nothing read from the catalog yet
    await manager.refresh_async()
    listing = {m["id"]: m for m in manager.list_models()}
    assert set(listing) == {DEFAULT_MODEL_NAME, "pulled-model"}  # the incomplete pull is not servable
    assert listing["pulled-model"]["shoal"] == {
        "cid": CID, "size": 123, "pinned": True, "loaded": False, "compiled_targets": [],
        "state": "available", "memory": None, "context_length": None, "keep_alive": None, "expires_at": None,
        "requests": 0}
    assert listing[DEFAULT_MODEL_NAME]["shoal"]["size"] == embedded_model_path().stat().st_size
    assert manager.resolve(CID).name == "pulled-model"
    manager.set_cid(DEFAULT_MODEL_NAME, "bafyembedded")
    assert manager.resolve("bafyembedded").name == DEFAULT_MODEL_NAME
    with pytest.raises(ModelNotFoundError, match="'half' does not exist"):
        manager.resolve("half")


async def test_resolve_reads_the_catalog_on_a_miss() -> None:
    calls = []

    def catalog() -> list[dict[str, Any]]:
        calls.append(1)
        return catalog_entries()

    manager = ModelManager(EventBus(), backend="numpy", catalog=catalog)
    assert manager.resolve("pulled-model").cid == CID
    assert len(calls) == 1
    with pytest.raises(ModelNotFoundError) as info:
        manager.resolve("nope")
    assert "have: pulled-model" in str(info.value)


async def test_a_model_loads_once_whatever_alias_or_cid_names_it() -> None:
    bus = EventBus()
    manager = ModelManager(bus, backend="numpy", catalog=catalog_entries)
    manager.add_embedded()
    manager.set_cid(DEFAULT_MODEL_NAME, CID)
    await manager.refresh_async()  # "pulled-model": the same CID under another name
    try:
        by_name = await manager.acquire(DEFAULT_MODEL_NAME)
        by_cid = await manager.acquire(CID)
        by_alias = await manager.acquire("pulled-model")
        assert by_cid is by_name and by_alias is by_name
        assert manager.loaded_names() == [DEFAULT_MODEL_NAME]
        assert len(bus.recent("model.loaded")) == 1
        assert await manager.unload("pulled-model") is True  # the alias names the one engine
        assert manager.loaded_names() == []
    finally:
        await manager.stop()


async def test_spans_in_use_on_the_stage_host_take_from_the_models_budget() -> None:
    """`hosted` (set by the split service: the spans in use for splits) counts against `[models]
    memory_budget_mb`: a load that fits the budget alone is refused when they hold most of it."""
    from shoal.models.errors import ModelMemoryBudgetError

    manager = ModelManager(EventBus(), backend="numpy", memory_budget=1 << 40)
    manager.add_embedded()
    manager.hosted = lambda: (1 << 40) - (1 << 20)
    try:
        assert manager.memory() == {"budget": 1 << 40, "used": 0, "hosted": (1 << 40) - (1 << 20)}
        with pytest.raises(ModelMemoryBudgetError):
            await manager.acquire(DEFAULT_MODEL_NAME)
        assert manager.loaded_names() == []
    finally:
        await manager.stop()
