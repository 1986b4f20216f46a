"""SVG snapshots of the main tabs against a real node (see `tests/tui/snapshot.py` for how they compare)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from shoal.tui.widgets.status import StatusBar
from shoal.tui.widgets.topology import TopologyView
from textual.widgets import DataTable, Input, Select, Static

from tests.tui.node_proc import TestNode
from tests.tui.pilot_util import SIZE, make_app, table_text, wait_until
from tests.tui.snapshot import check_snapshot

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def quiet_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestNode]:
    """A node that loads nothing at start, so what the tabs show does not depend on timing."""
    running = TestNode(tmp_path_factory.mktemp("snapnode"), env={"SHOAL_MODELS_PRELOAD": "false"}).start()
    yield running
    running.stop()


async def test_snapshots_of_the_main_tabs(quiet_node: TestNode, tmp_path: Path) -> None:
    app = make_app(quiet_node.url)
    volatile = {f"127.0.0.1:{quiet_node.port}": "127.0.0.1:<port>"}
    async with app.run_test(size=SIZE) as pilot:
        status = app.query_one(StatusBar)
        await wait_until(pilot, lambda: status.state == "connected", "the connection")
        node = (await app.client.health())["node"]
        volatile[str(node["id"])] = "<node-id>"
        volatile[str(node["version"])] = "<version>"

        topology = app.query_one(TopologyView)
        await wait_until(pilot, lambda: "1 node" in str(topology.render()), "the topology")
        await pilot.pause(0.3)
        check_snapshot("mesh", app.export_screenshot(), volatile, tmp_path)

        await pilot.press("2")
        models = app.query_one("#models-table", DataTable)
        await wait_until(pilot, lambda: MODEL in table_text(models), "the models table")
        await pilot.pause(0.3)
        check_snapshot("models", app.export_screenshot(), volatile, tmp_path)

        await pilot.press("3")
        select = app.query_one("#chat-model", Select)
        await wait_until(pilot, lambda: select.value == MODEL, "the chat model picker")
        await pilot.press("escape")
        await pilot.pause(0.3)
        check_snapshot("chat", app.export_screenshot(), volatile, tmp_path)

        await pilot.press("4")
        requests = app.query_one("#requests-table", DataTable)
        await wait_until(pilot, lambda: str(requests.border_title).startswith("Requests ("), "requests")
        await pilot.pause(0.3)
        check_snapshot("requests", app.export_screenshot(), volatile, tmp_path)

        await pilot.press("5")
        floor = app.query_one("#policy-battery_floor", Input)
        await wait_until(pilot, lambda: floor.value != "", "the policy")
        await wait_until(
            pilot,
            lambda: "node policy" in str(app.query_one("#policy-state", Static).render()),
            "the policy summary",
        )
        await pilot.pause(0.3)
        check_snapshot("policy", app.export_screenshot(), volatile, tmp_path)

        await pilot.press("question_mark")
        await pilot.pause(0.3)
        check_snapshot("help", app.export_screenshot(), volatile, tmp_path)
