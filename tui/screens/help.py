"""The key map of every tab, generated from the bindings themselves so it cannot drift."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

if TYPE_CHECKING:
    from shoal.tui.screens.base import NodePane


def _rows(bindings: list[BindingType]) -> list[tuple[str, str]]:
    rows = []
    for b in bindings:
        if isinstance(b, Binding):
            key, desc = b.key_display or b.key, b.description
        else:
            key, desc = b[0], b[2] if len(b) > 2 else b[1]
        rows.append((key.replace("question_mark", "?"), desc))
    return rows


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close"),
        Binding("q", "dismiss", "Close"),
    ]

    def __init__(self, tabs: tuple[tuple[str, str, type[NodePane]], ...]) -> None:
        super().__init__()
        self.tabs = tabs

    def compose(self) -> ComposeResult:
        table = Table(title="shoal tui — keys", show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        table.add_row(
            "1-6", "switch tab: " + ", ".join(f"{i} {t}" for i, (_, t, _p) in enumerate(self.tabs, 1))
        )
        table.add_row("tab", "move focus")
        table.add_row("esc", "leave a text field (then 1-6 switch tabs again)")
        from shoal.tui.app import ShoalApp  # the app's own bindings; imported late to avoid a cycle

        for key, desc in _rows([b for b in ShoalApp.BINDINGS if isinstance(b, Binding) and b.show]):
            table.add_row(key, desc)
        for _name, title, pane in self.tabs:
            rows = _rows(list(pane.BINDINGS))
            if rows:
                table.add_row("", "")
                table.add_row("", f"[b u]{title}[/b u]")
                for key, desc in rows:
                    table.add_row(key, desc)
        with VerticalScroll(id="help-box"):
            yield Static(table)
            yield Static("Esc / ? / q: close", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#help-box").focus()  # arrows / PgUp / PgDn scroll the key map

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
