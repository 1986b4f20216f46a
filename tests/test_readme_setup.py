"""The README's two setup commands, run as written from a fresh clone with the distribution's own python3.

On a stock Debian/Ubuntu/Raspberry Pi OS the system interpreter is "externally managed" (PEP 668) and refuses
`pip install`; `scripts/install.sh` must then make and use a project venv. Skipped, with the reason, where no
such interpreter exists. Slow (a venv with TVM, a compile): `-m slow`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SYSTEM_PYTHON = Path("/usr/bin/python3")
pytestmark = pytest.mark.slow


def readme_command(label: str) -> str:
    """The command in the README's fenced block that follows the line containing `label`."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(re.escape(label) + r".*?```\n(.+?)\n```", text, re.S)
    assert match, f"README has no command block after {label!r}"
    return match.group(1).strip()


def externally_managed(python: Path) -> bool:
    probe = ("import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join("
             "sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')) else 1)")
    return subprocess.run([str(python), "-c", probe], check=False).returncode == 0


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    if not SYSTEM_PYTHON.exists() or not externally_managed(SYSTEM_PYTHON):
        pytest.skip("no externally managed system python3 (PEP 668) on this machine")
    clone = tmp_path / "shoal"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    # The js-ipfs oracle is an npm install cache (3.5 min); reuse this checkout's, as a second clone would.
    oracle = REPO_ROOT / ".cache" / "jsipfs"
    if oracle.exists():
        shutil.copytree(oracle, clone / ".cache" / "jsipfs", symlinks=True)
    return clone


def clean_env(clone: Path) -> dict[str, str]:
    """A login-like environment whose python3 is the system one: no active venv, conda or pyenv."""
    keep = {k: os.environ[k] for k in ("HOME", "LANG", "TERM", "SHOAL_COMPILE_CACHE") if k in os.environ}
    return {**keep, "PATH": "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "PWD": str(clone)}


def test_readme_commands_on_an_externally_managed_python(fresh_clone: Path) -> None:
    env = clean_env(fresh_clone)
    first = readme_command("ask it something")
    run = subprocess.run(["bash", "-c", first], cwd=fresh_clone, env=env, capture_output=True, text=True,
                         timeout=1200, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in run.stdout
    assert "Traceback" not in run.stderr
    assert (fresh_clone / ".venv" / "bin" / "python").exists(), "install.sh did not make the project venv"

    # The test command as written, narrowed to one quick module (the full suite runs in CI from .ci/run).
    second = readme_command("Run the tests")
    assert second in (REPO_ROOT / ".ci" / "run").read_text(), ".ci/run must run the README's test command"
    env["PYTEST_ADDOPTS"] = "tests/models/test_sampling.py -q -p no:cacheprovider"
    run = subprocess.run(["bash", "-c", second], cwd=fresh_clone, env=env, capture_output=True, text=True,
                         timeout=1800, check=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert re.search(r"\d+ passed", run.stdout)
