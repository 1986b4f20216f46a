"""Policy tab: what this node does for the mesh. Every change is sent at once with `PUT /v1/policy`."""

from __future__ import annotations

from typing import Any, ClassVar

from shoal.tui.screens.base import NodePane
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import Input, Static, Switch

SWITCHES = (
    ("serve_others", "Serve other peers"),
    ("trusted_only_splits", "Split requests only across trusted peers"),
    ("prefer_local", "Prefer running requests locally"),
    ("metered", "On a metered link: serve no peers, run locally when possible"),
)
NUMBERS = (
    ("battery_floor", "Battery floor (%, 0-100): stop serving others below it", int, 0, 100),
    ("max_memory_share", "Max memory share (0-1) the node may use for others", float, 0.0, 1.0),
    ("max_tokens_per_peer_per_hour", "Tokens served per peer per hour (0: no quota)", int, 0, 1_000_000_000),
)


def parse_number(raw: str, kind: type, low: float, high: float) -> int | float:
    """Parse and range-check a number from an input; raises ValueError with a message for the user."""
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not low <= value <= high:
        raise ValueError(f"{value} is outside {low}–{high}")
    return value


class PolicyPane(NodePane):
    POLL = False
    MAIN = "Switch"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+r", "reload_policy", "Re-read policy")]

    def compose(self) -> ComposeResult:
        yield self.compose_unavailable()
        for key, label in SWITCHES:
            with Horizontal(classes="policy-row"):
                yield Switch(id=f"policy-{key}")
                yield Static("off", id=f"policy-{key}-state", classes="policy-onoff")
                yield Static(label, classes="policy-label")
        for key, label, *_ in NUMBERS:
            with Horizontal(classes="policy-row"):
                yield Input(id=f"policy-{key}", classes="policy-number")
                yield Static(label + "  (Enter applies)", classes="policy-label")
        yield Static("", id="policy-state")

    async def load(self) -> None:
        self.show(await self.client.policy())

    def show(self, policy: dict[str, Any]) -> None:
        for key, _ in SWITCHES:
            if key in policy:
                switch = self.query_one(f"#policy-{key}", Switch)
                with switch.prevent(Switch.Changed):
                    switch.value = bool(policy[key])
                self._show_state(key, switch.value)
        for key, *_ in NUMBERS:
            if key in policy:
                field = self.query_one(f"#policy-{key}", Input)
                if not field.has_focus:
                    field.value = str(policy[key])
        self.query_one("#policy-state", Static).update(
            "node policy: " + ", ".join(f"{k}={v}" for k, v in sorted(policy.items()))
        )

    def on_node_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "policy.changed" and isinstance(data.get("policy"), dict):
            self.show(data["policy"])

    def _show_state(self, key: str, on: bool) -> None:
        """The switch's state as a word too: screen readers, logs and tmux captures see no knob."""
        self.query_one(f"#policy-{key}-state", Static).update("on" if on else "off")

    def on_switch_changed(self, event: Switch.Changed) -> None:
        key = (event.switch.id or "").removeprefix("policy-")
        self._show_state(key, event.value)
        self.run_action(self._apply({key: event.value}), f"policy {key}")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        key = (event.input.id or "").removeprefix("policy-")
        for name, label, kind, low, high in NUMBERS:
            if name == key:
                try:
                    value = parse_number(event.value, kind, low, high)
                except ValueError as exc:
                    self.notify(f"{label.split('(')[0].strip()}: {exc}", severity="error")
                    return
                self.run_action(self._apply({key: value}), f"policy {key}")

    async def _apply(self, change: dict[str, Any]) -> None:
        policy = await self.client.set_policy(**change)
        self.show(policy)
        self.notify(", ".join(f"{k} = {v}" for k, v in change.items()), title="policy applied")

    def action_reload_policy(self) -> None:
        self.reload()
