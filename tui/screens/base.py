"""`NodePane`: the base of every tab. It reloads its data from the node in a worker and reacts to events."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from shoal.tui.client import NodeClient, NodeError, NodeUnreachable, NotAvailable
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widgets import Static

if TYPE_CHECKING:
    from shoal.tui.app import ShoalApp

logger = logging.getLogger(__name__)


class NodePane(Vertical):
    """A tab's content. Subclasses implement `load()` (async, fetches and shows data) and `on_node_event`."""

    MAIN: ClassVar[str] = ""
    """CSS selector of the widget that takes focus when the tab opens."""
    POLL: ClassVar[bool] = True
    """Reload every few seconds while shown (tabs fed fully by events, or edited by hand, say False)."""

    available: reactive[bool] = reactive(True)
    """False once the node said it has no endpoint for this tab (shown instead of an error)."""

    @property
    def shoal(self) -> ShoalApp:
        return self.app  # type: ignore[return-value]

    @property
    def client(self) -> NodeClient:
        return self.shoal.client

    def compose_unavailable(self) -> Static:
        """Subclasses yield this first: shown instead of their content when the node lacks the tab."""
        return Static("not available on this node", classes="unavailable")

    def watch_available(self, available: bool) -> None:
        self.set_class(not available, "-unavailable")

    def focus_main(self) -> None:
        if self.MAIN:
            for widget in self.query(self.MAIN):
                widget.focus()
                return

    def reload(self) -> None:
        """Fetch this tab's data again (in a worker: a newer reload cancels a stale one)."""
        if self.is_mounted:
            self.run_worker(self._reload, group=f"reload-{self.id}", exclusive=True, exit_on_error=False)

    async def _reload(self) -> None:
        try:
            await self.load()
            self.available = True
        except NotAvailable:
            self.available = False
        except NodeUnreachable as exc:
            self.shoal.report_unreachable(exc)
        except NodeError as exc:
            self.notify(f"{self.id}: {exc}", severity="error", timeout=8)
        except Exception as exc:  # a task boundary: show it, never a traceback on screen
            logger.exception("tab %s failed to load", self.id)
            self.notify(
                f"{self.id}: could not show the node's answer ({type(exc).__name__}: {exc})",
                severity="error",
                timeout=8,
            )

    async def load(self) -> None:
        """Fetch and show this tab's data."""

    def on_node_event(self, kind: str, data: dict[str, Any]) -> None:
        """React to one event from the node's `/v1/events` stream."""

    def run_action(self, coro: Any, what: str) -> None:
        """Run a user action in a worker; a newer action of the same `what` cancels a stale one.
        Errors go to `notify`, never a traceback."""
        self.run_worker(
            self._guard(coro, what), group=f"action-{self.id}-{what}", exclusive=True, exit_on_error=False
        )

    async def _guard(self, coro: Any, what: str) -> None:
        try:
            await coro
        except NotAvailable:
            self.notify(f"{what}: not available on this node", severity="warning")
        except NodeError as exc:
            self.notify(f"{what} failed: {exc}", severity="error", timeout=8)
        except Exception as exc:  # a task boundary, as above
            logger.exception("%s failed", what)
            self.notify(f"{what} failed: {type(exc).__name__}: {exc}", severity="error", timeout=8)
