"""Chat tab: pick a model, type a prompt, watch the answer stream in, and see the route the node took."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from rich.text import Text
from shoal.tui.client import NodeError, NotAvailable
from shoal.tui.format import describe_route
from shoal.tui.screens.base import NodePane
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Input, Select, Static

logger = logging.getLogger(__name__)

MAX_TOKENS = 128
"""Default answer length; tests shorten it on the pane (`ChatPane.max_tokens`)."""


class Transcript(Widget):
    """The conversation so far; `answer` grows as tokens stream in."""

    question: reactive[str] = reactive("", layout=True)
    answer: reactive[str] = reactive("", layout=True)
    route: reactive[str] = reactive("", layout=True)
    error: reactive[str] = reactive("", layout=True)
    status: reactive[str] = reactive("", layout=True)
    """Why the answer waits (the node's progress report), until more text arrives."""
    deltas: int = 0
    """Text deltas received for the current answer (a streamed answer has several)."""

    def render(self) -> Text:
        if not self.question:
            return Text("Type a prompt below and press Enter. Esc stops a running answer.", style="dim")
        text = Text()
        text.append("you  ", style="bold cyan")
        text.append(self.question + "\n\n")
        text.append("node ", style="bold green")
        text.append(self.answer or "…")
        if self.status:
            text.append(f"\n{self.status}", style="dim italic")
        if self.route:
            text.append(f"\n\nroute: {self.route}", style="italic magenta")
        if self.error:
            text.append(f"\n\n{self.error}", style="bold red")
        return text


class ChatPane(NodePane):
    POLL = False
    MAIN = "#prompt"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop answer / leave input"),
        Binding("ctrl+l", "clear", "Clear"),
    ]

    streaming: reactive[bool] = reactive(False)
    max_tokens: int = MAX_TOKENS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._model_ids: list[str] = []

    def compose(self) -> ComposeResult:
        yield self.compose_unavailable()
        with Horizontal(id="chat-bar"):
            yield Static("model", classes="field-label")
            yield Select[str]([], id="chat-model", prompt="(no model)", allow_blank=True)
            yield Static("", id="chat-route")
        with VerticalScroll(id="chat-log"):
            yield Transcript(id="transcript")
        yield Input(placeholder="Ask something… (Enter to send)", id="prompt")

    async def load(self) -> None:
        models = await self.client.models()
        select = self.query_one("#chat-model", Select)
        ids = [str(m.get("id")) for m in models]
        current = select.value if isinstance(select.value, str) else None
        if ids != self._model_ids:  # leave an open picker alone unless the list changed
            self._model_ids = ids
            select.set_options([(i, i) for i in ids])
        loaded = [str(m.get("id")) for m in models if (m.get("shoal") or {}).get("loaded")]
        choice = current if current in ids else (loaded or ids or [None])[0]
        if choice is not None and choice != select.value:
            select.value = choice

    def on_node_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind in ("model.loaded", "model.unloaded", "pull.done"):
            self.reload()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        prompt = event.value.strip()
        model = self.query_one("#chat-model", Select).value
        if not prompt:
            return
        if not isinstance(model, str):
            self.notify(
                "chat: no model on this node yet (pull or load one on the Models tab)", severity="warning"
            )
            return
        event.input.value = ""
        transcript = self.query_one(Transcript)
        transcript.question, transcript.answer, transcript.route, transcript.error = prompt, "", "", ""
        transcript.status = ""
        transcript.deltas = 0
        self.query_one("#chat-route", Static).update("")
        self.run_worker(self._stream(model, prompt), group="chat", exclusive=True, exit_on_error=False)

    async def _stream(self, model: str, prompt: str) -> None:
        transcript = self.query_one(Transcript)
        self.streaming = True
        try:
            await self._consume(model, prompt, transcript)
        except NotAvailable:
            transcript.error = "chat is not available on this node"
        except NodeError as exc:
            transcript.error = f"error: {exc}"
            self.notify(f"chat failed: {exc}", severity="error", timeout=8)
        except Exception as exc:  # a task boundary: show it, never a traceback on screen
            logger.exception("chat stream failed")
            transcript.error = f"error: {type(exc).__name__}: {exc}"
        finally:
            self.streaming = False
            transcript.status = ""

    async def _consume(self, model: str, prompt: str, transcript: Transcript) -> None:
        async for delta in self.client.chat(model, prompt, max_tokens=self.max_tokens):
            if delta.progress:
                transcript.status = delta.progress
            if delta.text:
                transcript.status = ""
                transcript.answer += delta.text
                transcript.deltas += 1
                self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)
            if delta.route:
                transcript.route = describe_route(delta.route)
                self.query_one("#chat-route", Static).update(
                    Text(f"route: {transcript.route}", style="magenta")
                )

    def watch_streaming(self, streaming: bool) -> None:
        self.set_class(streaming, "-streaming")

    def action_stop(self) -> None:
        if self.streaming:
            self.workers.cancel_group(self, "chat")
            self.notify("answer stopped", title="chat")
        else:
            self.shoal.action_focus_tabs()

    def action_clear(self) -> None:
        transcript = self.query_one(Transcript)
        transcript.question = transcript.answer = transcript.route = transcript.error = ""
