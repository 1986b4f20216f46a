"""`ShoalApp`: tabs over one node's API, a status bar and a footer.

The tabs do the work; this file wires them."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from shoal.tui.client import DEFAULT_API, NodeClient, NodeError
from shoal.tui.connection import Backoff, follow_node
from shoal.tui.launcher import NodeProcess
from shoal.tui.screens.base import NodePane
from shoal.tui.screens.chat import ChatPane
from shoal.tui.screens.help import HelpScreen
from shoal.tui.screens.logs import LogsPane
from shoal.tui.screens.mesh import MeshPane
from shoal.tui.screens.models import ModelsPane
from shoal.tui.screens.policy import PolicyPane
from shoal.tui.screens.requests import RequestsPane
from shoal.tui.widgets.status import StatusBar
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.css.query import NoMatches
from textual.widgets import Footer, TabbedContent, TabPane, Tabs

logger = logging.getLogger(__name__)

UNREACHABLE_NOTICE_S = 10.0
"""Least time between two "the node did not answer" notices."""

TABS: tuple[tuple[str, str, type[NodePane]], ...] = (
    ("mesh", "Mesh", MeshPane),
    ("models", "Models", ModelsPane),
    ("chat", "Chat", ChatPane),
    ("requests", "Requests", RequestsPane),
    ("policy", "Policy", PolicyPane),
    ("logs", "Logs", LogsPane),
)


class ShoalApp(App[None]):
    """The terminal control room for one shoal node and its mesh."""

    CSS_PATH = "shoal.tcss"
    TITLE = "shoal"
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(str(i), f"tab('{name}')", title, show=False) for i, (name, title, _) in enumerate(TABS, 1)),
        Binding("escape", "focus_tabs", "Leave input", show=False),
        Binding("r", "reload", "Refresh"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        api_url: str = DEFAULT_API,
        notice: str = "",
        *,
        refresh_s: float = 5.0,
        backoff: Backoff | None = None,
        started_node: NodeProcess | None = None,
    ) -> None:
        super().__init__()
        self.api_url = api_url
        self.notice = notice
        self.refresh_s = refresh_s
        self.backoff = backoff or Backoff()
        self.client = NodeClient(api_url)
        self.connected = False
        self.started_node = started_node
        """The node this session started (`shoal tui` with no node answering), watched for an early exit."""
        self._told_exit = False
        self._last_unreachable = 0.0

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with TabbedContent(initial="tab-mesh"):
            for i, (name, title, pane) in enumerate(TABS, 1):
                with TabPane(f"{i} {title}", id=f"tab-{name}"):
                    yield pane(id=name)
        yield Footer()

    def on_mount(self) -> None:
        status = self.query_one(StatusBar)
        status.url, status.notice = self.api_url, self.notice
        if self.notice:
            self.notify(self.notice, title="shoal tui")
        self.run_worker(
            follow_node(self.client, self._on_state, self._on_event, self.backoff),
            name="follow-node",
            group="follow-node",
            exit_on_error=False,
        )
        self.set_interval(self.refresh_s, self._refresh_active)

    async def on_unmount(self) -> None:
        await self.client.close()

    def _on_state(self, state: str, health: dict[str, Any] | None) -> None:
        status = self.query_one(StatusBar)
        was_connected, self.connected = self.connected, state == "connected"
        status.state = state
        if health:
            node = health.get("node") or {}
            status.node_name = str(node.get("name") or node.get("id") or "?")
            status.version = str(node.get("version") or "")
        if self.connected and not was_connected:
            for pane in self.query(NodePane):
                pane.reload()
        node = self.started_node
        if not self.connected and node is not None and not node.running() and not self._told_exit:
            self._told_exit = True
            self.notify(
                f"the node this TUI started exited (code {node.process.returncode}); see {node.log_path}",
                severity="error",
                timeout=30,
            )

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("kind", ""))
        data = {"time": event.get("time"), **(event.get("data") or {})}
        for pane in self.query(NodePane):
            try:
                pane.on_node_event(kind, data)
            except Exception as exc:  # a task boundary: one odd event must not stop the event stream
                logger.exception("tab %s failed on event %s", pane.id, kind)
                self.notify(f"{pane.id}: could not show a {kind} event ({exc})", severity="warning")

    def report_unreachable(self, exc: NodeError) -> None:
        """A tab's call got no answer. `follow_node` owns the connection state (it sees the event stream
        break or go silent); here we only say so, at most every few seconds."""
        now = time.monotonic()
        if self.connected and now - self._last_unreachable > UNREACHABLE_NOTICE_S:
            self._last_unreachable = now
            self.notify(f"the node did not answer: {exc}", severity="warning")

    def _refresh_active(self) -> None:
        try:
            pane = self.active_pane()
        except NoMatches:  # the timer fired while the app closes and its panes are being removed
            return
        if self.connected and pane.POLL:
            pane.reload()

    def active_pane(self) -> NodePane:
        active = self.query_one(TabbedContent).active.removeprefix("tab-")
        return self.query_one(f"#{active}", NodePane)

    def action_tab(self, name: str) -> None:
        self.query_one(TabbedContent).active = f"tab-{name}"

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane = self.active_pane()
        pane.focus_main()
        if self.connected:
            pane.reload()

    def action_focus_tabs(self) -> None:
        """Esc leaves a text field, so the number keys switch tabs again."""
        self.query_one(TabbedContent).query_one(Tabs).focus()

    def action_reload(self) -> None:
        self.active_pane().reload()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(TABS))
