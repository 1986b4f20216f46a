"""Fixtures shared by the mesh tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mesh.api_harness import NodeThread, shared_node, stop_shared_node


@pytest.fixture(scope="session")
def node() -> Iterator[NodeThread]:
    """One in-process node with the embedded model loaded, shared by the API tests (a module that needs
    another kind of node defines its own `node`)."""
    yield shared_node()
    stop_shared_node()
