"""Find the node at an API URL, or start one as a child process when nothing answers there (loopback only)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0


def probe(api_url: str, timeout: float = 1.5) -> bool:
    """True when a shoal node answers `GET /health` at `api_url`."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def is_loopback_url(api_url: str) -> bool:
    host = urlsplit(api_url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass
class NodeProcess:
    """A `shoal node` started for this TUI session; `stop()` (idempotent) ends it gracefully."""

    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("node pid %d ignored SIGTERM for %.0fs; killing it", self.pid, STOP_TIMEOUT_S)
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def start_node(
    api_url: str,
    extra_args: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
    log_dir: Path | None = None,
) -> NodeProcess:
    """Start `shoal node --api HOST:PORT` in the background, its output in a log file in `log_dir`
    (default: the temp dir)."""
    parts = urlsplit(api_url)
    if not is_loopback_url(api_url):
        raise ValueError(f"will only start a node on this machine's loopback, not {parts.hostname!r}")
    address = f"{parts.hostname}:{parts.port or 8740}"
    log_path = (log_dir or Path(tempfile.gettempdir())) / f"shoal-tui-node-{parts.port or 8740}.log"
    log = log_path.open("ab")
    command = [sys.executable, "-m", "shoal.mesh", "node", "--api", address, *(extra_args or [])]
    env = {**os.environ, **(extra_env or {})}
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )
    logger.info("started node pid %d at %s (log %s)", process.pid, address, log_path)
    return NodeProcess(process, log_path, log)
