"""Native helpers of the split's hot path, built from C source on the node itself the first time they are
needed, and cached like compiled models (`<compile cache>/native/`, keyed by the source and the Python ABI).

Why built here and not shipped: shoal installs from source (`pip install -e .`), and the node already needs a
C toolchain (TVM links every compiled model with it). A node without one, without Python's or OpenSSL's
headers, or with `[split] native_lane = false` runs the same steps in Python: `steplane()` returns None,
says why once in the log, and nothing else changes.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("steplane.c")
BUILD_TIMEOUT_S = 120.0
_lock = threading.Lock()
_loaded: ModuleType | None = None
_failed: str | None = None


def _compiler() -> str | None:
    configured = (sysconfig.get_config_var("CC") or "").split()
    for name in (*configured[:1], "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _target(cache: Path) -> Path:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    digest = hashlib.sha256(SOURCE.read_bytes() + suffix.encode()).hexdigest()[:16]
    return cache / f"_steplane-{digest}{suffix}"


def _build(target: Path) -> None:
    """Compile the extension into `target` (atomically: nodes that start together may build at once).
    Raises RuntimeError with the compiler's complaint."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    include = sysconfig.get_paths()["include"]
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as partial:
        temporary = Path(partial.name)
    try:
        command = [compiler, "-O2", "-shared", "-fPIC", f"-I{include}", str(SOURCE), "-o", str(temporary),
                   "-lcrypto"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} … failed: {done.stderr.strip()[-400:]}")
        os.replace(temporary, target)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"building the native step lane failed: {exc}") from None
    finally:
        temporary.unlink(missing_ok=True)


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader("_steplane", str(path))
    spec = importlib.util.spec_from_file_location("_steplane", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def steplane(cache: Path | None = None) -> ModuleType | None:
    """Blocking (a build takes ~1 s, once per machine): the native step lane, or None where it cannot be
    built or loaded (the reason is logged once)."""
    global _loaded, _failed
    with _lock:
        if _loaded is not None or _failed is not None:
            return _loaded
        from shoal.models.compile import cache_dir

        target = _target((cache or cache_dir()) / "native")
        try:
            if not target.exists():
                _build(target)
            _loaded = _import(target)
        except (RuntimeError, ImportError, OSError) as exc:
            _failed = str(exc)
            logger.warning("the native step lane is off (split steps run in Python): %s", _failed)
        return _loaded


def status() -> str:
    """"on", "off: <why>", or "not built" (nothing asked for it yet, or its build is under way)."""
    if _loaded is not None:
        return "on"
    return f"off: {_failed}" if _failed is not None else "not built"


def loaded() -> ModuleType | None:
    """The step lane if it was loaded already (never builds: safe on any thread, any time)."""
    return _loaded
