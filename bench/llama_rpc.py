"""llama.cpp's own split over the network (its RPC backend) as a contender in bench/split.py's rounds
(`--llama-rpc`): the named peer for a split's per-token cost, run on the same GGUF, cores and rounds.

The binaries come from scripts/build_llama_rpc.sh (.cache/llama-rpc/bin). One `rpc-server` per remote
stage, pinned where shoal's stage nodes run; `llama-bench` (the client) pinned where shoal's origin runs, one
thread everywhere. The layers sit as shoal's do: llama.cpp's `-ngl N` puts its last N "layers" on the RPC
servers, counting the output head as the layer after the last block, and `-ts` shares them out. So a 3-stage
step runs blocks 0-9 on the client, 10-19 on one server, 20-29 and the head on the other (`-ngl 21 -ts
10/11`); a 2-stage step blocks 0-14 on the client, the rest and the head on the server (`-ngl 16`). Unlike
shoal's chain, the client relays the hidden state between the servers (a star: four transfers a step against
shoal's three), and the logits come back from the last server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from tests.nodes import free_port  # below the ephemeral range: no clash with the nodes' own connections

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".cache" / "llama-rpc" / "bin"
CACHE = REPO / ".cache" / "llama-rpc" / "tensors"
LAYERS = 30
"""SmolLM2-135M's layers."""
START_TIMEOUT_S = 20.0
RUN_TIMEOUT_S = 300.0


def missing() -> str | None:
    """Why the contender cannot run here, or None."""
    for tool in ("ggml-rpc-server", "llama-bench"):
        if not os.access(BIN / tool, os.X_OK):
            return f"{BIN / tool} is missing: run scripts/build_llama_rpc.sh first"
    return None


class LlamaRpc:
    """Running `rpc-server`s and a way to time llama.cpp's decode through them."""

    def __init__(self, model: Path, server_prefixes: list[list[str]], client_prefix: list[str]) -> None:
        self.model = model
        self.client_prefix = client_prefix
        self.ports: list[int] = []
        self.servers: list[subprocess.Popen] = []
        env = {**os.environ, "LLAMA_CACHE": str(CACHE)}  # -c: tensors by hash, not re-sent every run
        try:
            for prefix in server_prefixes:
                port = free_port()
                command = [*prefix, str(BIN / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                           "-t", "1", "-c"]
                self.servers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL))
                self.ports.append(port)
            for port in self.ports:
                _wait_listening(port)
        except BaseException:
            self.close()
            raise

    def decode_rate(self, stages: int, tokens: int) -> float:
        """llama.cpp's decode tok/s (`llama-bench` tg) over `stages` - 1 of the servers; 1: local."""
        command = [*self.client_prefix, str(BIN / "llama-bench"), "-m", str(self.model), "-p", "0",
                   "-n", str(tokens), "-r", "1", "-t", "1", "-o", "json"]
        if stages > 1:
            share = [LAYERS // stages] * (stages - 1)
            share[-1] += 1  # the head, with the last blocks
            servers = ",".join(f"127.0.0.1:{port}" for port in self.ports[:stages - 1])
            command += ["-ngl", str(sum(share)), "-rpc", servers, "-ts", "/".join(map(str, share))]
        else:
            command += ["-ngl", "0"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"llama-bench failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        results = json.loads(done.stdout)
        return float(results[0]["avg_ts"])

    def close(self) -> None:
        for server in self.servers:
            server.kill()
            server.wait()
        self.servers.clear()


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"rpc-server on port {port} did not start within {START_TIMEOUT_S:.0f} s")
