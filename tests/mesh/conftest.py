"""Fixtures shared by the mesh tests."""

from __future__ import annotations

import shutil
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from shoal.mesh.split import native

from tests.mesh.api_harness import NodeThread, shared_node, stop_shared_node


@pytest.fixture(scope="session")
def node() -> Iterator[NodeThread]:
    """One in-process node with the embedded model loaded, shared by the API tests (a module that needs
    another kind of node defines its own `node`)."""
    yield shared_node()
    stop_shared_node()


def lane_missing() -> str | None:
    """Why the native step lane cannot be built on this machine, or None."""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "no C compiler"
    if not any((Path(d) / "openssl" / "evp.h").exists() for d in ("/usr/include", "/usr/local/include")):
        return "no OpenSSL headers"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers"
    return None


@pytest.fixture(scope="session")
def lane() -> ModuleType:
    """The native step lane (`split.native`), built into the tests' compile cache. Where this machine cannot
    build it, the reason is the skip's (a node there runs the generic path, which every other test covers);
    where it can, it must build."""
    missing = lane_missing()
    if missing is not None:
        pytest.skip(f"the native step lane cannot be built here: {missing}")
    module = native.steplane()
    assert module is not None, "the native step lane failed to build (see the log)"
    return module


@pytest.fixture(params=["python", "native"])
def native_lane(request) -> Callable[[], ModuleType | None]:
    """A stage host's `native_lane`: the generic path only, or with the native step lane."""
    if request.param == "python":
        return lambda: None
    module = request.getfixturevalue("lane")
    return lambda: module
