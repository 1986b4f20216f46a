"""Fixtures of the TUI tests: one real node per module (restart tests get their own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.tui.node_proc import TestNode


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestNode]:
    running = TestNode(tmp_path_factory.mktemp("node")).start()
    yield running
    running.stop()
