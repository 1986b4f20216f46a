"""A real node on a free loopback port, run on its own event loop in a background thread, for API tests.

`BACKEND` picks how the embedded model runs in every API test (switch it in one place). The shared node
(`shared_node()`) loads the model once per test process; tests that need special settings start their own
`NodeThread` with `preload=False`.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from shoal.mesh.node.config import NodeConfig, load_config
from shoal.mesh.node.model_loading import LoadFn, load_engine
from shoal.mesh.node.node import build_node

BACKEND = "tvm"
"""`tvm` (compiled; use once models/runtime.py is fast here) or `numpy` (reference)."""
MODEL = "smollm2-135m-instruct"
START_TIMEOUT_S = 600.0

T = TypeVar("T")


def make_config(data_dir: Path, **sections: dict[str, Any]) -> NodeConfig:
    overrides: dict[str, Any] = {"data_dir": str(data_dir), "name": "test-node"}
    if os.environ.get("SHOAL_COMPILE_CACHE"):  # the suite's compile cache (tests/conftest.py)
        overrides["compile_cache"] = os.environ["SHOAL_COMPILE_CACHE"]
    overrides["api"] = {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 5.0, **sections.pop("api", {})}
    overrides["models"] = {"backend": BACKEND, **sections.pop("models", {})}
    overrides["mesh"] = {"mdns": False, **sections.pop("mesh", {})}
    overrides["ipfs"] = {"rpc_url": None, **sections.pop("ipfs", {})}
    # no speed probe (seconds of compute beside the test's requests at each load) unless a test asks
    overrides["split"] = {"speed_probe": False, **sections.pop("split", {})}
    overrides.update(sections)
    return load_config(environ={}, overrides=overrides)


def slow_load(seconds: float) -> LoadFn:
    """An injected fault: model loads that take `seconds` longer (as a cold compile or a slow disk would) —
    a warm compile cache loads the embedded model in under the 1 s before a stream reports a wait."""

    def load(*args: Any) -> Any:
        time.sleep(seconds)
        return load_engine(*args)

    return load


class NodeThread:
    """Runs the node `shoal node` runs (`build_node(config)`: IPFS, mesh, routing) on a private loop in a
    daemon thread; `call` runs a coroutine there."""

    def __init__(self, config: NodeConfig, load_fn: LoadFn = load_engine) -> None:
        self.node = build_node(config, load_fn=load_fn)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-node", daemon=True)
        self._stopped = False

    def start(self, wait_ready: bool = True) -> NodeThread:
        self._thread.start()
        self.call(self.node.start())
        if wait_ready:
            self.call(self.node.wait_ready())
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = START_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def url(self) -> str:
        return self.node.api_url

    def active_sequences(self) -> int:
        async def count() -> int:
            return self.node.models.active_sequences()

        return self.call(count())

    def kv_sequences(self) -> int | None:
        """Sequences holding a KV cache in the stages (None when the stages cannot tell)."""

        async def count() -> int | None:
            total = 0
            for name in self.node.models.loaded_names():
                served = self.node.models.served(name)
                for stage in served.stages if served else []:
                    if not hasattr(stage, "sequence_ids"):
                        return None
                    total += len(stage.sequence_ids())
            return total

        return self.call(count())

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self.node.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


_shared: NodeThread | None = None
_shared_lock = threading.Lock()


def shared_node() -> NodeThread:
    """One node with the embedded model loaded, shared by the API tests of this process."""
    global _shared
    with _shared_lock:
        if _shared is None:
            data_dir = Path(tempfile.mkdtemp(prefix="shoal-api-test-"))
            _shared = NodeThread(make_config(data_dir)).start()
        return _shared


def stop_shared_node() -> None:
    """Stop the shared node (idempotent: every module using it calls this at session end)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.stop()
            _shared = None


def free_env() -> dict[str, str]:
    """Environment for `shoal` subprocesses: no user config, the suite's compile cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_") or k == "SHOAL_COMPILE_CACHE"}
    env["SHOAL_CONFIG"] = os.devnull
    env["SHOAL_MESH_MDNS"] = "false"
    env["SHOAL_IPFS_RPC_URL"] = "none"
    return env


async def read_sse(response: Any) -> list[Any]:
    """All `data:` payloads of an SSE response (parsed JSON, or the raw `[DONE]` string)."""
    import orjson

    frames: list[Any] = []
    async for line in response.content:
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            frames.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return frames


def chat_body(content: str = "What is the capital of France?", **params: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **params}
