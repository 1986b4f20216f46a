"""Pilot tests of the TUI against a real `shoal node` process on loopback."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from shoal.tui.client import NodeClient
from shoal.tui.screens.chat import ChatPane, Transcript
from shoal.tui.screens.prompt import PromptScreen
from shoal.tui.widgets.progress import JobProgress
from shoal.tui.widgets.status import StatusBar
from textual.widgets import DataTable, Input, RichLog, Select, Static, Switch

from tests.tui.node_proc import NODE_NAME, TestNode
from tests.tui.pilot_util import SIZE, capture_notices, make_app, table_text, wait_until

MODEL = "smollm2-135m-instruct"


async def node_json(node: TestNode, path: str) -> dict:
    client = NodeClient(node.url)
    try:
        return await client.get(path)
    finally:
        await client.close()


async def test_every_tab_shows_live_data(node: TestNode) -> None:
    health = await node_json(node, "/health")
    policy = await node_json(node, "/v1/policy")
    app = make_app(node.url)
    async with app.run_test(size=SIZE) as pilot:
        status = app.query_one(StatusBar)
        await wait_until(pilot, lambda: status.state == "connected", "the status bar to say connected")
        assert status.node_name == NODE_NAME

        mesh_self = app.query_one("#mesh-self", Static)
        await wait_until(pilot, lambda: health["node"]["id"] in str(mesh_self.render()), "this node's id")
        peers = app.query_one("#peers", DataTable)
        await wait_until(pilot, lambda: str(peers.border_title).startswith("Peers "), "the peers section")

        await pilot.press("2")
        models = app.query_one("#models-table", DataTable)
        await wait_until(pilot, lambda: MODEL in table_text(models), "the models table")
        assert "98.4 MB" in table_text(models)

        await pilot.press("3")
        select = app.query_one("#chat-model", Select)
        await wait_until(pilot, lambda: select.value == MODEL, "the chat model picker")

        await pilot.press("escape", "4")
        requests = app.query_one("#requests-table", DataTable)
        await wait_until(pilot, lambda: str(requests.border_title).startswith("Requests ("), "requests")

        await pilot.press("5")
        switch = app.query_one("#policy-serve_others", Switch)
        floor = app.query_one("#policy-battery_floor", Input)
        await wait_until(pilot, lambda: floor.value == str(policy["battery_floor"]), "the policy inputs")
        assert switch.value is policy["serve_others"]

        await pilot.press("6")
        log = app.query_one("#log", RichLog)
        await wait_until(pilot, lambda: any("listening" in ln.text for ln in log.lines), "the node log")
        await pilot.press("f")  # INFO -> WARNING: the INFO lines go
        await wait_until(pilot, lambda: "WARNING" in str(log.border_title), "the level filter")
        await wait_until(
            pilot, lambda: not any("listening" in ln.text for ln in log.lines), "INFO lines gone"
        )

        await pilot.press("question_mark")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "HelpScreen", "the help screen")
        await pilot.press("escape")
        assert app.screen.__class__.__name__ != "HelpScreen"


async def test_pull_shows_progress_to_completion(node: TestNode) -> None:
    app = make_app(node.url)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        models = app.query_one("#models-table", DataTable)
        await wait_until(pilot, lambda: MODEL in table_text(models), "the models table")
        await pilot.press("p")
        await wait_until(pilot, lambda: isinstance(app.focused, Input), "the pull prompt")
        assert app.focused.value == MODEL
        await pilot.press("enter")

        def pulls() -> list[JobProgress]:
            return [job for job in app.query(JobProgress) if job.job_id.startswith("pull:")]

        await wait_until(pilot, lambda: len(pulls()) == 1, "a pull progress row")
        job = pulls()[0]
        await wait_until(pilot, lambda: job.state != "running", "the pull to finish")
        assert job.state == "done", job.detail
        assert job.total == 98_362_432
        assert job.progress == job.total


async def test_chat_streams_and_shows_the_route(node: TestNode) -> None:
    app = make_app(node.url)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        pane = app.query_one(ChatPane)
        pane.max_tokens = 6
        select = app.query_one("#chat-model", Select)
        await wait_until(pilot, lambda: select.value == MODEL, "the chat model picker")
        transcript = app.query_one(Transcript)
        seen: list[str] = []
        await pilot.press(*"What is the capital of France?", "enter")

        def finished() -> bool:
            if transcript.answer and (not seen or seen[-1] != transcript.answer):
                seen.append(transcript.answer)
            return not pane.streaming and bool(transcript.route or transcript.error)

        await wait_until(pilot, finished, "the answer and its route", within=120)
        assert not transcript.error
        assert transcript.question == "What is the capital of France?"
        assert transcript.deltas >= 2, f"the answer arrived in one piece, not streamed: {seen}"
        assert transcript.route.startswith("local")

        await pilot.press("escape", "4")
        requests = app.query_one("#requests-table", DataTable)
        await wait_until(pilot, lambda: MODEL in table_text(requests), "the request in the Requests tab")


async def test_policy_change_reaches_the_node(node: TestNode) -> None:
    before = await node_json(node, "/v1/policy")
    app = make_app(node.url)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        floor = app.query_one("#policy-battery_floor", Input)
        await wait_until(pilot, lambda: floor.value == str(before["battery_floor"]), "the policy")
        switch = app.query_one("#policy-serve_others", Switch)
        switch.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: switch.value is not before["serve_others"], "the switch to flip")
        floor.focus()
        floor.value = ""
        new_floor = 35 if before["battery_floor"] != 35 else 40
        await pilot.press(*str(new_floor), "enter")

        async def applied() -> dict:
            return await node_json(node, "/v1/policy")

        for _ in range(100):
            after = await applied()
            if after["battery_floor"] == new_floor and after["serve_others"] is not before["serve_others"]:
                break
            await pilot.pause(0.1)
        assert after["serve_others"] is not before["serve_others"]
        assert after["battery_floor"] == new_floor
        floor.value = ""
        await pilot.press(*"250", "enter")  # out of range: refused in the TUI, never sent
        await pilot.pause(0.3)
        assert (await applied())["battery_floor"] == new_floor


async def test_unknown_endpoints_read_as_not_available(node: TestNode) -> None:
    client = NodeClient(node.url)
    try:
        with pytest.raises(Exception, match="not available on this node") as info:
            await client.get("/v1/no-such-endpoint")
        assert type(info.value).__name__ == "NotAvailable"
        with pytest.raises(Exception, match="does not exist") as info:
            await client.model_action("no-such-model", "load")
        assert type(info.value).__name__ == "ApiError"
    finally:
        await client.close()
    assert orjson.dumps(await node_json(node, "/health"))


async def test_unload_and_load_from_the_models_tab(node: TestNode) -> None:
    app = make_app(node.url)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        models = app.query_one("#models-table", DataTable)

        def loaded() -> bool:
            return "| loaded |" in table_text(models)

        await wait_until(pilot, lambda: MODEL in table_text(models), "the models table")
        if not loaded():
            await pilot.press("l")
            await wait_until(pilot, loaded, "the model to load", within=120)
        await pilot.press("u")
        await wait_until(pilot, lambda: not loaded(), "the model to unload")
        assert MODEL not in (await node_json(node, "/health"))["models"]
        await pilot.press("l")
        await wait_until(pilot, loaded, "the model to load again", within=120)
        assert MODEL in (await node_json(node, "/health"))["models"]
        # loading prepares (compiles) the model: its progress row ends as done
        compiles = [job for job in app.query(JobProgress) if job.job_id == f"compile:{MODEL}"]
        assert len(compiles) == 1 and compiles[0].state == "done"


async def test_publish_a_file_from_the_models_tab(node: TestNode, tmp_path: Path) -> None:
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 1200)  # 300 KiB: two 256 KiB chunks
    app = make_app(node.url)
    told = capture_notices(app)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        models = app.query_one("#models-table", DataTable)
        await wait_until(pilot, lambda: MODEL in table_text(models), "the models table")
        await pilot.press("b")
        await wait_until(pilot, lambda: isinstance(app.screen, PromptScreen), "the publish prompt")
        app.screen.query_one(Input).value = str(blob)
        await pilot.press("enter")
        await wait_until(pilot, lambda: any(m.startswith("published") for m in told), "the published notice")
        notice = next(m for m in told if m.startswith("published"))
        assert notice.startswith(f"published {blob}: bafy")
