"""A model bigger than any one member's memory budget, split automatically across three real node
processes (`tests.nodes.NodeProcess`, i.e. `python -m shoal.mesh node`): for `test_big_split.py` and
`bench/big_split.py`.

`shaped_file(shape, dir)` writes a real-size llama-shaped GGUF with random quantized blocks
(`bench/shaped_gguf.py`). `BigMesh` publishes it on one member (`publisher`, which then holds the file) and
starts two more that hold nothing (`origin`, where requests go, and `helper`); every member's
`[policy] max_memory_share` is set so that its advertised budget is `share` of what the planner estimates the
whole model needs (weights + KV + a stage's overhead), and `[models] memory_budget_mb` to the same: with
`share` ≤ ~0.5 no member can hold it alone and no two can, so the planner must use all three (and the
publisher cannot load it either). `single` starts a fourth node that holds the file with a budget
that fits it (the reference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.mesh.mesh_nodes import wait_until
from tests.nodes import REPO, NodeProcess, merged, node_env

NAME = "big-llama"
"""The catalog name the publisher gives the file."""
MESH_TIMING = {"heartbeat_interval_s": 1.0, "dead_timeout_s": 20.0, "gossip_interval_s": 1.0,
               "retry_max_s": 2.0}
"""Quick adverts; a patient dead-link timeout: building a stage (loading TVM, packing a span's weights) on a
loaded 2-core machine can keep a node's loop from answering heartbeats for seconds, and no test here kills a
member."""
STAGE_OVERHEAD = 16 * 1024 * 1024  # mesh.split.router.STAGE_OVERHEAD


def shaped_file(shape: str, mix: str, directory: Path) -> Path:
    """`bench/shaped_gguf.py`'s file for `shape` (written once per directory)."""
    path = directory / f"{shape}.{mix}.gguf"
    if not path.exists():
        sys.path.insert(0, str(REPO))
        from bench.shaped_gguf import write

        part = path.with_suffix(".part")
        write(shape, mix, part)
        part.rename(path)
    return path


def whole_need(path: Path, context_tokens: int) -> int:
    """Bytes the planner estimates one stage holding every layer of `path` needs (`ModelShape.span_memory`,
    with a stage's overhead)."""
    from shoal.mesh.split.cost_model import ModelShape
    from shoal.models.gguf import GGUFModel
    from shoal.models.span import LayerSpan

    model = GGUFModel.open(path)
    shape = ModelShape.from_config(model.config, path.stat().st_size)
    return shape.span_memory(LayerSpan.whole(model.config.num_layers), context_tokens, STAGE_OVERHEAD)


def publish(path: Path, data_dir: Path, name: str = NAME) -> str:
    """`shoal publish FILE --name NAME --data-dir DIR` (before the node starts); returns the CID."""
    out = subprocess.run([sys.executable, "-m", "shoal.mesh", "publish", str(path), "--name", name,
                          "--data-dir", str(data_dir)], cwd=REPO, env=node_env(), capture_output=True,
                         text=True, timeout=600, check=True)
    return out.stdout.strip().splitlines()[-1]


def span_fetches(node: NodeProcess, timeout_s: float = 1.0) -> list[dict[str, Any]]:
    """The `span.fetched` events the node still remembers (`GET /v1/events?replay=1`, read until quiet for
    `timeout_s`: the replayed events are queued at once and follow the stream's opening comment back to back;
    3 s each, the four reads were 12 s of the big-split test)."""
    request = urllib.request.Request(node.url + "/v1/events?replay=1", headers=node.auth_headers())
    found = []
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    if event.get("kind") == "span.fetched":
                        found.append(event["data"])
    except TimeoutError:
        pass
    return found


@dataclass
class BigMesh:
    """Three members (origin, helper, publisher) whose budgets are each `share` of the model's need."""

    base: Path
    model_path: Path
    share: float = 0.5
    backend: str = "numpy"
    context_tokens: int = 128
    """Prompt + completion the budgets are sized for (the planner adds the KV cache of that many)."""
    prefixes: dict[str, list[str]] = field(default_factory=dict)
    """Command prefixes per member name (`taskset -c 1`)."""
    env: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """More settings for every node, by section (`{"split": {"open_timeout_s": 3600}}`)."""
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    cid: str = ""

    @property
    def need(self) -> int:
        return whole_need(self.model_path, self.context_tokens)

    def share_of_memory(self, fraction: float) -> float:
        """`max_memory_share` for a budget of `fraction` × the model's need."""
        return fraction * self.need / psutil.virtual_memory().total

    def settings(self, fraction: float, secret: str, bootstrap: list[str]) -> dict[str, Any]:
        budget_mb = max(16, int(fraction * self.need) >> 20)  # the loaded models' budget says the same
        return merged({
            # the compiled backend allocates its KV pool for cache_tokens up front, and a held span counts it
            # (split.held_spans.span_bytes): sized as the budgets are, so a span the planner fits stays held
            "models": {"backend": self.backend, "preload": False, "context": 1024, "max_batch": 2,
                       "memory_budget_mb": budget_mb, "cache_tokens": self.context_tokens},
            "policy": {"max_memory_share": self.share_of_memory(fraction)},
            "mesh": {"secret": secret, "bootstrap": bootstrap, **MESH_TIMING},
            "split": {"speed_probe": False},
        }, self.extra)

    def start(self) -> BigMesh:
        secret = os.urandom(32).hex()
        publisher = self.node("publisher", self.settings(self.share, secret, []))
        self.cid = publish(self.model_path, publisher.data_dir)
        publisher.start(300)
        for name in ("origin", "helper"):
            self.node(name, self.settings(self.share, secret, [publisher.api])).launch()
        for name in ("origin", "helper"):
            self.nodes[name].wait_ready(300)
        origin = self.nodes["origin"]
        wait_until(lambda: self.sees(origin, ("helper", "publisher")) and self.sees(
            self.nodes["helper"], ("publisher",)), 90, "the members linked, with the publisher's catalog")
        return self

    def node(self, name: str, settings: dict[str, Any]) -> NodeProcess:
        node = NodeProcess(name, self.base / name, settings, prefix=self.prefixes.get(name, []),
                           env={"OPENBLAS_NUM_THREADS": "1", **self.env})
        self.nodes[name] = node
        return node

    def sees(self, node: NodeProcess, others: tuple[str, ...]) -> bool:
        peers = {p["id"]: p for p in node.get("/v1/mesh/peers")["peers"] if p["state"] == "connected"}
        for other in others:
            advert = peers.get(self.nodes[other].peer_id, {}).get("advert", {})
            split = advert.get("split", {})
            if not split.get("serve_others"):
                return False
            if other == "publisher" and NAME not in split.get("catalog", {}):
                return False
        return True

    def single(self, name: str = "single", prefix: list[str] | None = None) -> NodeProcess:
        """A node holding the file with a budget that fits it, in no mesh (the reference run)."""
        settings = merged({"models": {"backend": self.backend, "preload": False, "context": 1024,
                                      "max_batch": 2},
                           "policy": {"max_memory_share": 0.9}, "split": {"speed_probe": False}}, self.extra)
        node = NodeProcess(name, self.base / name, settings, prefix=prefix or [],
                           env={"OPENBLAS_NUM_THREADS": "1", **self.env})
        publish(self.model_path, node.data_dir)
        self.nodes[name] = node
        return node.start(300)

    def policy(self, name: str, fraction: float) -> None:
        share = self.share_of_memory(fraction)
        reply = self.nodes[name].call("PUT", "/v1/policy", {"max_memory_share": share})
        assert "error" not in reply, reply

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()


def chat(node: NodeProcess, model: str, max_tokens: int, question: str = "Say hello.", *,
         logprobs: bool = True) -> dict:
    """A greedy chat completion (with the top 3 logprobs of each token unless `logprobs` is off)."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": question}],
                            "max_tokens": max_tokens, "temperature": 0}
    if logprobs:
        body.update(logprobs=True, top_logprobs=3)
    return node.call("POST", "/v1/chat/completions", body, timeout=900)
