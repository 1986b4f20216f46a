"""`JobProgress`: one pull or compile with a bar, its rate and ETA, and a final done/failed state."""

from __future__ import annotations

from typing import Any

from shoal.tui.format import human_bytes, human_eta, human_rate
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widgets import Label, ProgressBar


class JobProgress(Horizontal):
    """A row `pull smollm2 [=====    ] 45.1 MB/98.4 MB  12.0 MB/s  ETA 4s`. State lives in reactive fields,
    so updates that arrive before the row is mounted are kept and shown once it is."""

    state: reactive[str] = reactive("running")
    detail: reactive[str] = reactive("starting…")
    total: reactive[float | None] = reactive(None)
    progress: reactive[float] = reactive(0.0)

    def __init__(self, job_id: str, title: str) -> None:
        super().__init__(classes="job -running")
        self.job_id = job_id
        self.job_title = title

    def compose(self) -> ComposeResult:
        yield Label(self.job_title, classes="job-title")
        yield ProgressBar(total=self.total, show_eta=False, classes="job-bar")
        yield Label(self.detail, classes="job-detail")

    def on_mount(self) -> None:
        self._sync()

    def _sync(self) -> None:
        bars, details = self.query(ProgressBar), self.query(".job-detail")
        if not bars or not details:  # not composed yet: `on_mount` syncs
            return
        bars.first().update(total=self.total, progress=self.progress)
        details.first(Label).update(self.detail)

    def watch_detail(self) -> None:
        self._sync()

    def watch_progress(self) -> None:
        self._sync()

    def watch_state(self, state: str) -> None:
        for name in ("running", "done", "failed"):
            self.set_class(name == state, f"-{name}")

    def pull_progress(self, data: dict[str, Any]) -> None:
        self.state = "running"  # the same job id may run again (a second compile of one model)
        done, total = data.get("bytes_done"), data.get("bytes_total")
        if total:
            self.total = float(total)
        self.progress = float(done or 0)
        parts = [f"{human_bytes(done)}/{human_bytes(total)}"]
        if data.get("rate_bps") is not None:
            parts.append(human_rate(data.get("rate_bps")))
        if data.get("eta_s") is not None:
            parts.append(f"ETA {human_eta(data.get('eta_s'))}")
        self.detail = "  ".join(parts)

    def fraction_progress(self, fraction: float, message: str = "") -> None:
        self.state = "running"
        self.total = 100.0
        self.progress = max(0.0, min(1.0, fraction)) * 100
        self.detail = message or f"{fraction * 100:.0f}%"

    def restart(self) -> None:
        """Show the job as starting again (a new compile of the same model)."""
        self.state, self.total, self.progress, self.detail = "running", None, 0.0, "starting…"

    def finish(self, ok: bool, message: str) -> None:
        if ok:
            self.total = self.total or 100.0
            self.progress = self.total
        self.state = "done" if ok else "failed"
        self.detail = message
