"""Models tab: local and catalog models (size, CID, pinned, loaded, compiled targets); pull with progress,
compile with progress, load/unload, publish a file."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from shoal.tui.client import NotAvailable
from shoal.tui.format import human_bytes, short_id
from shoal.tui.screens.base import NodePane
from shoal.tui.screens.prompt import PromptScreen
from shoal.tui.widgets.progress import JobProgress
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import DataTable

MODEL_COLUMNS = ("model", "size", "CID", "pinned", "loaded", "compiled for", "owner")
MAX_JOBS = 6


def _state(meta: dict[str, Any]) -> Text:
    """The node's `shoal.state` (loaded / loading / available; older nodes: the `loaded` flag)."""
    state = meta.get("state") or ("loaded" if meta.get("loaded") else None)
    if state == "loaded":
        return Text("loaded", style="green")
    if state == "loading":
        return Text("loading…", style="yellow")
    return Text("—", style="dim")


def model_row(model: dict[str, Any]) -> tuple[Any, ...]:
    meta = model.get("shoal") or {}
    loaded = bool(meta.get("loaded"))
    return (
        Text(str(model.get("id")), style="bold" if loaded else ""),
        human_bytes(meta.get("size")) if meta.get("size") is not None else "—",
        short_id(meta.get("cid"), 20),
        "yes" if meta.get("pinned") else "no",
        _state(meta),
        ", ".join(str(t) for t in meta.get("compiled_targets") or []) or "—",
        str(model.get("owned_by") or "—"),
    )


def merge_catalog(models: list[dict[str, Any]], catalog: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The node's models (`/v1/models`), with CIDs filled in from its IPFS catalog (`/v1/ipfs/models`),
    then the catalog entries it does not serve, as rows owned by `catalog`."""
    by_name = {name: entry for entry in catalog for name in entry.get("names") or []}
    rows = []
    for model in models:
        meta = dict(model.get("shoal") or {})
        entry = by_name.get(str(model.get("id")))
        if entry and not meta.get("cid"):
            meta["cid"] = entry.get("cid")
        rows.append({**model, "shoal": meta})
    served = {str(m.get("id")) for m in models} | {str((m.get("shoal") or {}).get("cid")) for m in models}
    for entry in catalog:
        names = list(entry.get("names") or [])
        if served & {*names, str(entry.get("cid"))}:
            continue
        if entry.get("complete"):
            state = "catalog (stored)"
        else:
            state = "catalog (partial)" if entry.get("pinned") else "catalog"
        meta = {"cid": entry.get("cid"), "size": entry.get("size"), "pinned": entry.get("pinned")}
        rows.append({"id": names[0] if names else entry.get("cid"), "owned_by": state, "shoal": meta})
    return rows


class ModelsPane(NodePane):
    MAIN = "#models-table"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "pull", "Pull"),
        Binding("c", "compile", "Compile"),
        Binding("l", "load", "Load"),
        Binding("u", "unload", "Unload"),
        Binding("b", "publish", "Publish file"),
    ]

    def compose(self) -> ComposeResult:
        yield self.compose_unavailable()
        table: DataTable[Any] = DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
        table.border_title = "Models"
        yield table
        jobs = VerticalScroll(id="jobs")
        jobs.border_title = "Pulls and compiles"
        yield jobs

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*MODEL_COLUMNS)

    async def load(self) -> None:
        models = await self.client.models()
        try:
            catalog = await self.client.catalog()
        except NotAvailable:
            catalog = []
        rows = merge_catalog(models, catalog)
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for model in rows:
            table.add_row(*model_row(model), key=str(model.get("id")))
        served = len(models)
        table.border_title = f"Models ({served} on this node, {len(rows) - served} more in the catalog)"
        if rows:
            table.move_cursor(row=min(row, len(rows) - 1))

    def selected_model(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return str(key.value) if key.value is not None else None

    # -- jobs ----------------------------------------------------------------------------------------

    def job(self, job_id: str, title: str | None = None) -> JobProgress | None:
        for job in self.query(JobProgress):
            if job.job_id == job_id:
                return job
        if title is None:
            return None
        jobs = self.query_one("#jobs")
        finished = [j for j in self.query(JobProgress) if j.state != "running"]
        for old in finished[: max(0, len(jobs.children) + 1 - MAX_JOBS)]:
            old.remove()
        job = JobProgress(job_id, title)
        jobs.mount(job)
        return job

    def on_node_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "pull.progress":
            job = self.job(
                f"pull:{data.get('pull_id')}", f"pull {data.get('model') or short_id(data.get('cid'))}"
            )
            if job:
                job.pull_progress(data)
        elif kind in ("pull.done", "pull.failed"):
            job = self.job(f"pull:{data.get('pull_id')}", f"pull {data.get('model') or ''}")
            ok = kind == "pull.done"
            if job:
                job.finish(ok, "done" if ok else f"failed: {data.get('error', '?')}")
            if not ok:
                self.notify(f"pull failed: {data.get('error', '?')}", severity="error", timeout=8)
            self.reload()
        elif kind == "compile.progress":
            job = self.job(f"compile:{data.get('model')}", f"compile {data.get('model')}")
            if job:
                job.fraction_progress(float(data.get("fraction") or 0.0), str(data.get("message") or ""))
        elif kind in ("compile.done", "compile.failed"):
            job = self.job(f"compile:{data.get('model')}", f"compile {data.get('model')}")
            ok = kind == "compile.done"
            if job:
                job.finish(ok, "compiled" if ok else f"failed: {data.get('error', '?')}")
            self.reload()
        elif kind in ("model.loaded", "model.unloaded"):
            self.reload()

    # -- actions -------------------------------------------------------------------------------------

    def action_pull(self) -> None:
        def chosen(model: str | None) -> None:
            if model:
                self.run_action(self._pull(model), "pull")

        self.app.push_screen(
            PromptScreen("Pull a model (name or CID)", "smollm2-135m-instruct", self.selected_model() or ""),
            chosen,
        )

    async def _pull(self, model: str) -> None:
        result = await self.client.pull(model)
        pull_id = str(result.get("pull_id"))
        job = self.job(f"pull:{pull_id}", f"pull {model}")
        if job and job.state == "running" and job.detail == "starting…":
            job.detail = f"started ({short_id(result.get('cid'), 16)})"

    def action_compile(self) -> None:
        model = self._need_model("compile")
        if model is None:
            return

        def chosen(layers: str | None) -> None:
            if layers is not None:
                job = self.job(f"compile:{model}", f"compile {model}")
                if job:
                    job.restart()
                self.run_action(self._compile(model, "" if layers == "all" else layers), "compile")

        self.app.push_screen(
            PromptScreen(f"Compile {model} for this node: layers a:b, or all", "0:30", "all"), chosen
        )

    async def _compile(self, model: str, layers: str) -> None:
        result = await self.client.model_action(model, "compile", {"layers": layers} if layers else None)
        self.notify(f"compiled {model} layers {result.get('layers', 'all')}", title="models")

    def action_load(self) -> None:
        if model := self._need_model("load"):
            self.run_action(self._load(model, "load"), "load")

    def action_unload(self) -> None:
        if model := self._need_model("unload"):
            self.run_action(self._load(model, "unload"), "unload")

    async def _load(self, model: str, action: str) -> None:
        await self.client.model_action(model, action)
        self.notify(f"{model}: {action}ed", title="models")
        self.reload()

    def action_publish(self) -> None:
        def chosen(path: str | None) -> None:
            if path:
                self.run_action(self._publish(path), "publish")

        self.app.push_screen(
            PromptScreen("Publish a GGUF file to the mesh (a path on this machine; it is uploaded)",
                         "/path/model.gguf"),
            chosen,
        )

    async def _publish(self, path: str) -> None:
        result = await self.client.publish(path)
        size = f" ({human_bytes(result['size'])})" if result.get("size") is not None else ""
        self.notify(f"published {path}: {result.get('cid')}{size}", title="models", timeout=10)
        self.reload()

    def _need_model(self, what: str) -> str | None:
        model = self.selected_model()
        if model is None:
            self.notify(f"{what}: select a model first", severity="warning")
        return model
