"""Several models on one node within its memory budget, loaded on first use and unloaded when idle
(`keep_alive`), listed with their state — real nodes (in-process, real HTTP, real compiled modules) with the
embedded SmolLM2 and a second model: the same weights in a different GGUF (its `general.name` changed), so a
different file the node serves as a model of its own, compiled from the shared cache.

Budgets are given in units of one model's estimate (`estimate_need` at the test's `cache_tokens`)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from shoal.mesh.node.model_residency import estimate_need
from shoal.models.embedded import embedded_model_path

from tests.mesh.api_harness import MODEL, NodeThread, free_env, make_config

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.timeout(600)

OTHER = "smollm2-twin"
CACHE_TOKENS = 256
NEED = estimate_need(embedded_model_path(), "tvm", cache_tokens=CACHE_TOKENS, max_batch=8, context=None)
NAME = b"Smollm2 135M 8k Lc100K Mix1 Ep2"
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded GGUF with one byte of its `general.name` changed: a different, valid model file."""
    data = embedded_model_path().read_bytes()
    assert data.count(NAME) == 1
    path = tmp_path_factory.mktemp("twin") / "smollm2-twin.gguf"
    path.write_bytes(data.replace(NAME, NAME[:-1] + b"3"))
    return path


@pytest.fixture
def start(tmp_path: Path, twin: Path) -> Iterator[Callable[..., NodeThread]]:
    """Start a node whose budget holds `budget` models, serving the embedded model and the twin."""
    nodes: list[NodeThread] = []

    def _start(budget: float, **models: Any) -> NodeThread:
        settings = {"preload": False, "keep_default_loaded": False, "cache_tokens": CACHE_TOKENS,
                    "memory_budget_mb": int(NEED * budget) >> 20, **models}
        node = NodeThread(make_config(tmp_path / f"data{len(nodes)}", models=settings))
        nodes.append(node)
        node.start(wait_ready=settings["preload"])

        async def register() -> None:
            node.node.models.register(OTHER, twin)

        node.call(register())
        return node

    yield _start
    for node in nodes:
        node.stop()


async def states(node: NodeThread) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(node.url + "/v1/models") as r:
        assert r.status == 200
        return {m["id"]: m["shoal"] for m in (await r.json())["data"]}


async def until(node: NodeThread, name: str, state: str, within: float = 60.0) -> dict[str, Any]:
    """Poll `/v1/models` until `name` is in `state`; its entry."""
    deadline = time.monotonic() + within
    while True:
        entry = (await states(node))[name]
        if entry["state"] == state:
            return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stayed {entry['state']}, not {state}, for {within} s: {entry}")
        await asyncio.sleep(0.2)


def unloads(node: NodeThread) -> list[tuple[str, str]]:
    return [(e.data["model"], e.data.get("reason")) for e in node.node.bus.recent("model.unloaded")]


async def unloaded(node: NodeThread, name: str, reason: str, within: float = 30.0) -> None:
    """Poll the node's events until `name` was unloaded for `reason` (the event follows the listed state)."""
    deadline = time.monotonic() + within
    while (name, reason) not in unloads(node):
        if time.monotonic() > deadline:
            raise AssertionError(f"no ({name}, {reason}) unload in {within} s: {unloads(node)}")
        await asyncio.sleep(0.1)


async def chat(node: NodeThread, model: str, **extra: Any) -> Any:
    client = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0)
    return await client.chat.completions.create(model=model, messages=HI, max_tokens=4, temperature=0,
                                                **extra)


async def chat_when_room(node: NodeThread, model: str, within_s: float = 60.0) -> Any:
    """`chat`, retried after a 503 with Retry-After as the header says (a busy model may free up)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await chat(node, model)
        except openai.APIStatusError as exc:
            retry_after = exc.response.headers.get("Retry-After")
            if exc.status_code != 503 or retry_after is None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(min(float(retry_after), 1.0))


async def test_two_models_load_on_first_use_and_list_their_state(start: Callable[..., NodeThread]) -> None:
    node = start(2.5)
    before = await states(node)
    assert before[MODEL]["state"] == before[OTHER]["state"] == "available"
    assert before[MODEL]["memory"] is None
    first, second = await chat(node, MODEL), await chat(node, OTHER)
    assert first.choices[0].message.content and second.choices[0].message.content
    listed = await states(node)
    now = time.time()
    async with aiohttp.ClientSession() as session, session.get(node.url + "/v1/models") as r:
        memory = (await r.json())["shoal"]
    assert memory == {"memory_budget": int(NEED * 2.5) >> 20 << 20, "memory_used": 2 * NEED}
    for name in (MODEL, OTHER):
        assert listed[name]["state"] == "loaded" and listed[name]["loaded"] is True
        assert listed[name]["memory"] == NEED and listed[name]["keep_alive"] == 300
        assert now + 250 < listed[name]["expires_at"] <= now + 301
    running = await ollama.AsyncClient(host=node.url).ps()
    by_name = {m.model: m for m in running.models}
    assert set(by_name) == {MODEL + ":latest", OTHER + ":latest"}
    assert by_name[OTHER + ":latest"].size == NEED and by_name[OTHER + ":latest"].context_length == 256
    assert by_name[OTHER + ":latest"].expires_at > datetime.now(UTC)


async def test_ollama_keep_alive_zero_unloads_and_an_empty_chat_loads(
        start: Callable[..., NodeThread]) -> None:
    node = start(2.5)
    client = ollama.AsyncClient(host=node.url)
    answer = await client.chat(model=OTHER, messages=HI, options={"num_predict": 4}, keep_alive=0)
    assert answer.done and answer.message.content
    await until(node, OTHER, "available")  # right after the request
    await unloaded(node, OTHER, "keep_alive")
    assert OTHER + ":latest" not in [m.model for m in (await client.ps()).models]
    warm = await client.chat(model=OTHER, messages=[], keep_alive="10m")
    assert warm.done_reason == "load"
    entry = (await states(node))[OTHER]
    assert entry["state"] == "loaded" and entry["keep_alive"] == 600
    assert (await client.ps()).models[0].model == OTHER + ":latest"
    gone = await client.generate(model=OTHER, keep_alive=0)  # an empty prompt with keep_alive 0: unload
    assert gone.done_reason == "unload"
    await until(node, OTHER, "available")
    embedded = await client.embed(model=OTHER, input="hi", keep_alive=0)  # loads, embeds, unloads
    assert len(embedded.embeddings[0]) == 576
    await until(node, OTHER, "available")
    with pytest.raises(ollama.ResponseError) as err:
        await client.generate(model=OTHER, prompt="x", keep_alive="soon")
    assert err.value.status_code == 400 and "keep_alive" in str(err.value)


async def test_a_budget_for_one_unloads_the_idle_model_first(start: Callable[..., NodeThread]) -> None:
    node = start(1.5)
    await chat(node, MODEL)
    await chat(node, OTHER)  # MODEL is idle: it makes room
    listed = await states(node)
    assert listed[MODEL]["state"] == "available" and listed[OTHER]["state"] == "loaded"
    assert unloads(node) == [(MODEL, "memory_budget")]
    # While OTHER streams an answer it is busy: MODEL cannot have its room (503, worth retrying).
    client = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model=OTHER, messages=[{"role": "user", "content": "Count from 1 to 100."}], max_tokens=200,
        temperature=0, stream=True)
    async with stream:
        async for _ in stream:
            break  # the first chunk: OTHER is serving
        other = {"model": MODEL, "messages": HI, "max_tokens": 4}
        async with aiohttp.ClientSession() as session, session.post(
                node.url + "/v1/chat/completions", json=other) as r:
            body = await r.json()
            assert r.status == 503 and r.headers["Retry-After"] == "5"
    error = body["error"]
    assert error["code"] == "model_memory_budget" and error["param"] == "model"
    assert f"'{OTHER}'" in error["message"] and "serving requests" in error["message"]
    # OTHER's request is over once the node has seen its client go (the disconnect reaches the engine a moment
    # later): a client that honours Retry-After then gets the room
    await chat_when_room(node, MODEL)
    listed = await states(node)
    assert listed[MODEL]["state"] == "loaded" and listed[OTHER]["state"] == "available"
    assert unloads(node)[-1] == (OTHER, "memory_budget")


async def test_a_budget_that_fits_no_model_is_a_coded_error(start: Callable[..., NodeThread]) -> None:
    node = start(0.5)
    with pytest.raises(openai.APIStatusError) as info:
        await chat(node, MODEL)
    assert info.value.status_code == 503 and "Retry-After" not in info.value.response.headers
    assert info.value.body["code"] == "model_memory_budget"
    assert "more than this node's whole memory budget" in info.value.body["message"]
    with pytest.raises(ollama.ResponseError) as err:
        await ollama.AsyncClient(host=node.url).generate(model=OTHER, prompt="hi")
    assert err.value.status_code == 503
    assert all(entry["state"] == "available" for entry in (await states(node)).values())


async def test_idle_models_unload_after_keep_alive_and_the_default_stays(
        start: Callable[..., NodeThread]) -> None:
    node = start(3.0, keep_alive_s=1.0, keep_default_loaded=True, preload=True)
    await chat(node, MODEL)
    await chat(node, OTHER)
    await until(node, OTHER, "available", within=30)  # idle for keep_alive_s
    await unloaded(node, OTHER, "keep_alive")
    kept = (await states(node))[MODEL]
    assert kept["state"] == "loaded" and kept["keep_alive"] == -1 and kept["expires_at"] is None
    client = ollama.AsyncClient(host=node.url)
    await client.generate(model=OTHER, prompt="hi", options={"num_predict": 2}, keep_alive="10m")
    entry = (await states(node))[OTHER]  # its own keep_alive, not the node's 1 s
    assert entry["state"] == "loaded" and entry["keep_alive"] == 600
    assert entry["expires_at"] > time.time() + 500
    await chat(node, OTHER, extra_body={"shoal": {"keep_alive": -1}})  # the OpenAI routes' extension
    entry = (await states(node))[OTHER]
    assert entry["keep_alive"] == -1 and entry["expires_at"] is None
    with pytest.raises(openai.BadRequestError) as bad:
        await chat(node, OTHER, extra_body={"shoal": {"keep_alive": "a while"}})
    assert bad.value.body["param"] == "shoal.keep_alive"
    running = {m.model: m for m in (await client.ps()).models}
    assert running[MODEL + ":latest"].expires_at.year == 2262  # kept loaded: Go's largest time, as Ollama
    # `shoal models` (the block store's catalog) asks the node for each model's STATE
    command = [sys.executable, "-m", "shoal.mesh", "models", "--json", "--api", node.url,
               "--data-dir", str(node.node.config.data_dir)]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120,
                                   env=free_env(), check=True)
    listing = json.loads(done.stdout)
    assert listing["node"] is True
    assert next(m for m in listing["models"] if MODEL in m["names"])["state"] == "loaded"
