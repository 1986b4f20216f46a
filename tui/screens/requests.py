"""Requests tab: recent and live requests with route, TTFT, tok/s and status; re-planned ones highlighted."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from shoal.tui.format import clock, describe_route, number, route_kind, route_replans
from shoal.tui.screens.base import NodePane
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Static

REQUEST_COLUMNS = ("id", "model", "route", "status", "TTFT ms", "tok/s", "tokens", "started", "re-plans")
MAX_ROWS = 200
_STATUS_STYLE = {
    "stop": "green",
    "length": "green",
    "running": "bold yellow",
    "ok": "green",
    "done": "green",
    "error": "bold red",
    "failed": "bold red",
    "cancelled": "dim",
}


def request_label(request_id: Any) -> str:
    """The part of a request id that differs between requests: the id without its kind, cut from the left
    (ids end in a counter; a cut from the right showed the same `chatcmpl-…` text for all)."""
    text = str(request_id or "").split("-", 1)[-1]
    if not text:
        return "—"
    return text if len(text) <= 14 else "…" + text[-13:]


def request_row(record: dict[str, Any]) -> tuple[Any, ...]:
    route = record.get("route")
    replans = route_replans(route, record)
    highlight = "bold black on yellow" if replans else ""
    status = str(record.get("status") or "?")
    return (
        Text(request_label(record.get("id")), style=highlight),
        str(record.get("model") or "—"),
        Text(route_kind(route), style=highlight),
        Text(status, style=_STATUS_STYLE.get(status, "")),
        number(record.get("ttft_ms"), 0),
        number(record.get("tok_s"), 1),
        str(record.get("tokens") if record.get("tokens") is not None else "—"),
        clock(record.get("started")),
        Text(f"↻ {replans}", style=highlight) if replans else "",
    )


class RequestsPane(NodePane):
    MAIN = "#requests-table"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("x", "clear_done", "Hide finished")]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records: dict[str, dict[str, Any]] = {}
        self.hidden: set[str] = set()

    def compose(self) -> ComposeResult:
        yield self.compose_unavailable()
        table: DataTable[Any] = DataTable(id="requests-table", cursor_type="row", zebra_stripes=True)
        table.border_title = "Requests"
        yield table
        yield Static("", id="request-detail")

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*REQUEST_COLUMNS)

    async def load(self) -> None:
        for record in await self.client.requests():
            if str(record.get("id")) not in self.hidden:
                self.records[str(record.get("id"))] = dict(record)
        self.redraw()

    def on_node_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in ("request.started", "request.finished"):
            return
        key = str(data.get("id"))
        record = self.records.setdefault(key, {})
        record.update({k: v for k, v in data.items() if v is not None})
        if kind == "request.started":
            record.setdefault("status", "running")
            record.setdefault("started", data.get("time"))
        else:
            record["status"] = data.get("status") or "ok"
        self.redraw()

    def redraw(self) -> None:
        ordered = sorted(self.records.values(), key=lambda r: str(r.get("started") or ""), reverse=True)
        for stale in ordered[MAX_ROWS:]:
            self.records.pop(str(stale.get("id")), None)
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for record in ordered[:MAX_ROWS]:
            table.add_row(*request_row(record), key=str(record.get("id")))
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))
        running = sum(1 for r in ordered if r.get("status") == "running")
        replanned = sum(1 for r in ordered if route_replans(r.get("route"), r))
        table.border_title = f"Requests ({len(ordered)}, {running} running, {replanned} re-planned)"

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        record = self.records.get(str(event.row_key.value))
        if record is None:
            return
        self.query_one("#request-detail", Static).update(
            Text.assemble(
                (f"{record.get('id')}  ", "bold"),
                f"{record.get('model')}  route: ",
                (describe_route(record.get("route")), "magenta"),
                f"  status: {record.get('status')}  finished: {clock(record.get('finished'))}",
            )
        )

    def action_clear_done(self) -> None:
        self.hidden.update(k for k, r in self.records.items() if r.get("status") != "running")
        self.records = {k: r for k, r in self.records.items() if k not in self.hidden}
        self.redraw()
