"""Labels a person (or a screen reader, a log, a tmux capture) reads: on/off in words, request ids that
differ, "not in a mesh", the invite where no toast covers it. Pilot tests against a real node process."""

from __future__ import annotations

import aiohttp
from shoal.tui.widgets.status import StatusBar
from textual.widgets import DataTable, Static, Switch

from tests.tui.node_proc import TestNode
from tests.tui.pilot_util import SIZE, make_app, table_text, wait_until

MODEL = "smollm2-135m-instruct"


async def complete_once(node: TestNode) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    async with aiohttp.ClientSession() as session, session.post(f"{node.url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()


async def test_policy_switches_say_on_or_off(node: TestNode) -> None:
    app = make_app(node.url)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        switch = app.query_one("#policy-serve_others", Switch)
        state = app.query_one("#policy-serve_others-state", Static)

        def says(word: str) -> bool:
            return str(state.render()) == word

        await wait_until(pilot, lambda: says("on" if switch.value else "off"), "the switch's state in words")
        before = switch.value
        switch.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: says("off" if before else "on"), "the word to follow the switch")
        await pilot.press("enter")  # put the node's policy back
        await wait_until(pilot, lambda: says("on" if before else "off"), "the word to follow back")


async def test_mesh_tab_says_not_in_a_mesh_and_puts_the_invite_above_the_peers(node: TestNode) -> None:
    app = make_app(node.url)
    async with app.run_test(size=SIZE) as pilot:
        peers = app.query_one("#peers", DataTable)
        await wait_until(pilot, lambda: str(peers.border_title).startswith("Peers "), "the peers section")
        assert "not in a mesh" in str(peers.border_title)
        assert "allow-list" not in str(peers.border_title)
        assert app.query_one("#invite", Static).region.y < peers.region.y


async def test_requests_tab_shows_a_different_id_for_each_request(node: TestNode) -> None:
    await complete_once(node)
    await complete_once(node)
    app = make_app(node.url)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        requests = app.query_one("#requests-table", DataTable)
        await wait_until(pilot, lambda: len(requests.rows) >= 2, "two requests in the table", within=60)
        ids = [line.split(" | ")[0] for line in table_text(requests).splitlines()]
        assert len(set(ids)) == len(ids), ids


async def test_the_header_shows_the_node_version(node: TestNode) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{node.url}/health") as response:
        version = (await response.json())["node"]["version"]
    app = make_app(node.url)
    async with app.run_test(size=SIZE) as pilot:
        status = app.query_one(StatusBar)
        await wait_until(pilot, lambda: status.state == "connected", "the status bar to say connected")
        assert f"shoal {version}" in status.render().plain
