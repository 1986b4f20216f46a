"""A real `shoal node` child process on loopback for the TUI tests (started through `tui.launcher`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.tui.launcher import NodeProcess, probe, start_node

from tests.nodes import free_port

NODE_NAME = "tui-test-node"
START_TIMEOUT_S = 120.0


@dataclass
class TestNode:
    """One node's data dir and port; `start()`/`stop()` may be repeated (a restart keeps both)."""

    __test__ = False

    data_dir: Path
    port: int = field(default_factory=free_port)
    backend: str = "tvm"
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the node process (e.g. `SHOAL_MODELS_PRELOAD`)."""
    process: NodeProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TestNode:
        config = self.data_dir / "config.toml"  # empty: the defaults, whatever the user's config says
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config.touch()
        args = ["--config", str(config), "--data-dir", str(self.data_dir), "--backend", self.backend]
        self.process = start_node(self.url, args, {"SHOAL_NAME": NODE_NAME, **self.env}, self.data_dir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not probe(self.url, timeout=1.0):
            if not self.process.running() or time.monotonic() > deadline:
                self.stop()
                tail = self.process.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"shoal node at {self.url} did not come up; log tail:\n{tail}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
