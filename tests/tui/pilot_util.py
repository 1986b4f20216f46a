"""Helpers for Pilot tests: build the app for a test node, wait for a condition, read tables as text."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from shoal.tui.app import ShoalApp
from shoal.tui.connection import Backoff
from textual.pilot import Pilot
from textual.widgets import DataTable

SIZE = (110, 32)


def make_app(url: str, notice: str = "") -> ShoalApp:
    return ShoalApp(url, notice, refresh_s=2.0, backoff=Backoff(first=0.2, cap=1.0, poll=0.5))


async def wait_until(pilot: Pilot[Any], predicate: Callable[[], Any], what: str, within: float = 60) -> None:
    """Let the app run until `predicate()` is true; fail naming `what` after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.1)


def table_text(table: DataTable[Any]) -> str:
    """Every cell of a DataTable (plain text), one row per line."""
    rows = []
    for row_key in table.rows:
        rows.append(" | ".join(str(getattr(cell, "plain", cell)) for cell in table.get_row(row_key)))
    return "\n".join(rows)


def capture_notices(app: ShoalApp) -> list[str]:
    """Record every `notify` message of `app` (still shown as usual) in the returned list."""
    told: list[str] = []
    original = app.notify

    def notify(message: str, **kwargs: Any) -> None:
        told.append(str(message))
        original(message, **kwargs)

    app.notify = notify  # type: ignore[method-assign]
    return told
