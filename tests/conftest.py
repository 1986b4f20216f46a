"""Suite-wide settings. Tests that compile a model share one compile cache (and so do node processes that
tests start), so a fresh clone compiles each shard once per run of the suite."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPILE_CACHE = REPO_ROOT / ".cache" / "compile"

os.environ.setdefault("SHOAL_COMPILE_CACHE", str(COMPILE_CACHE))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
