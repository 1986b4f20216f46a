"""`shoal models` lists a held file's architecture, quantization, parameters, context and memory (a real CLI
process on a real block store)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.models.family_gguf import write_family_gguf


def _shoal(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "shoal.mesh", *args], capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout


def test_models_shows_what_each_file_is(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    gguf = write_family_gguf("qwen3", tmp_path / "q.gguf")
    _shoal("publish", str(gguf), "--name", "tiny-qwen3", "--data-dir", data)
    listing = json.loads(_shoal("models", "--json", "--data-dir", data))
    entry = next(m for m in listing["models"] if "tiny-qwen3" in m["names"])
    summary = entry["summary"]
    assert summary["architecture"] == "qwen3" and summary["quantization"] == "F32"
    assert summary["context_length"] == 256 and summary["parameters"] > 100_000
    assert summary["memory_bytes"] > gguf.stat().st_size
    table = _shoal("models", "--data-dir", data)
    header, row = table.splitlines()[0], next(line for line in table.splitlines() if "tiny-qwen3" in line)
    assert header.split()[-5:] == ["ARCH", "QUANT", "PARAMS", "CTX", "MEM@2k"]
    # the last two cells: MEM as "N MiB"
    assert row.split()[-6:-2] == ["qwen3", "F32", f"{summary['parameters'] / 1e3:.0f}k", "256"]
