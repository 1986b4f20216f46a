"""The top bar: which node, whether the TUI is connected to it, and how it got there."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

_STATES = {
    "connecting": ("◌", "bold yellow", "connecting"),
    "connected": ("●", "bold green", "connected"),
    "disconnected": ("○", "bold red", "disconnected — retrying"),
}


class StatusBar(Static):
    """`shoal <version> ▸ <node>  ● connected  <url>  <notice>` — all reactive (the version is the node's)."""

    state: reactive[str] = reactive("connecting")
    node_name: reactive[str] = reactive("")
    version: reactive[str] = reactive("")
    url: reactive[str] = reactive("")
    notice: reactive[str] = reactive("")

    def render(self) -> Text:
        mark, style, label = _STATES.get(self.state, _STATES["disconnected"])
        text = Text()
        text.append(f" shoal {self.version} " if self.version else " shoal ", style="bold reverse")
        text.append(f" ▸ {self.node_name or '?'} ", style="bold")
        text.append(f" {mark} {label} ", style=style)
        text.append(f" {self.url}", style="dim")
        if self.notice:
            text.append(f"  {self.notice}", style="italic")
        return text

    def watch_state(self, state: str) -> None:
        for name in _STATES:
            self.set_class(name == state, f"-{name}")
