"""Suite-wide settings. Tests that compile a model share one compile cache (and so do node processes that
tests start), so a fresh clone compiles each shard once per run of the suite."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPILE_CACHE = REPO_ROOT / ".cache" / "compile"

os.environ.setdefault("SHOAL_COMPILE_CACHE", str(COMPILE_CACHE))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _has_avx2() -> bool:
    try:
        return " avx2 " in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# OpenBLAS picks its float kernels by CPU (Haswell's on AVX2, SkylakeX's on AVX-512): they sum in different
# orders, and the float32 ulps that moves flip an int8 activation code now and then. The tests that reproduce
# llama.cpp's recorded logits step for step (test_family_blocks.py, `ROUNDING_EXACT`) count exact steps, so
# the suite uses Haswell's kernels wherever they run (every x86-64 CPU with AVX2), whatever the machine.
if _has_avx2():
    os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")
