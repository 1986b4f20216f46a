"""Logs tab: the node's log, live, filtered by level (f cycles DEBUG → INFO → WARNING → ERROR)."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from shoal.tui.format import clock
from shoal.tui.screens.base import NodePane
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.widgets import RichLog

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LEVEL_STYLE = {"DEBUG": "dim", "INFO": "", "WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red"}
LIMIT = 200


def level_rank(level: str) -> int:
    level = level.upper()
    return LEVELS.index(level) if level in LEVELS else (len(LEVELS) if level == "CRITICAL" else 1)


def log_line(line: dict[str, Any]) -> Text:
    level = str(line.get("level") or "INFO").upper()
    return Text.assemble(
        (clock(line.get("time")) + " ", "dim"),
        (f"{level:<7} ", _LEVEL_STYLE.get(level, "")),
        (f"{line.get('logger', '')}: ", "cyan"),
        str(line.get("message", "")),
    )


class LogsPane(NodePane):
    POLL = False
    MAIN = "#log"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "cycle_level", "Level filter"),
        Binding("ctrl+l", "clear", "Clear"),
    ]

    level: reactive[str] = reactive("INFO")

    def compose(self) -> ComposeResult:
        yield self.compose_unavailable()
        yield RichLog(id="log", max_lines=2000, wrap=True, highlight=False, markup=False)

    def on_mount(self) -> None:
        self.watch_level(self.level)

    def watch_level(self, level: str) -> None:
        self.query_one(RichLog).border_title = f"Log — level ≥ {level}  (f: change)"

    async def load(self) -> None:
        lines = await self.client.logs(level=self.level, limit=LIMIT)
        log = self.query_one(RichLog)
        log.clear()
        for line in lines:
            if level_rank(str(line.get("level", "INFO"))) >= level_rank(self.level):
                log.write(log_line(line))

    def on_node_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "log" and level_rank(str(data.get("level", "INFO"))) >= level_rank(self.level):
            self.query_one(RichLog).write(log_line(data))

    def action_cycle_level(self) -> None:
        self.level = LEVELS[(LEVELS.index(self.level) + 1) % len(LEVELS)]
        self.reload()

    def action_clear(self) -> None:
        self.query_one(RichLog).clear()
