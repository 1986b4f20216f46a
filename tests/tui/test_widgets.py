"""Widgets in a bare Textual app (no node needed): the pull/compile progress row."""

from __future__ import annotations

from shoal.tui.widgets.progress import JobProgress
from textual.app import App, ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar


class Host(App[None]):
    def compose(self) -> ComposeResult:
        yield Vertical(id="box")


async def test_job_progress_row_through_its_life() -> None:
    app = Host()
    async with app.run_test() as pilot:
        job = JobProgress("pull:1", "pull smollm2")
        # an event may arrive before the row is mounted: it is kept and shown once it is
        job.pull_progress({"bytes_done": 50_000, "bytes_total": 100_000, "rate_bps": 10_000.0, "eta_s": 5})
        await app.query_one("#box").mount(job)
        await pilot.pause()
        bar = job.query_one(ProgressBar)
        detail = job.query_one(".job-detail", Label)
        assert (bar.total, bar.progress) == (100_000, 50_000)
        assert str(detail.render()) == "50.0 KB/100.0 KB  10.0 KB/s  ETA 5s"

        job.finish(True, "done")
        await pilot.pause()
        assert bar.progress == bar.total and job.has_class("-done") and not job.has_class("-running")

        job.restart()
        await pilot.pause()
        assert job.has_class("-running") and bar.progress == 0 and str(detail.render()) == "starting…"

        job.fraction_progress(0.25, "layer 8/30")
        job.finish(False, "failed: disk full")
        await pilot.pause()
        assert job.has_class("-failed") and bar.progress == 25 and str(detail.render()) == "failed: disk full"
