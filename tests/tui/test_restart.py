"""The TUI survives its node restarting: it says so, keeps working, reconnects and reloads."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from shoal.tui.app import ShoalApp
from shoal.tui.client import NodeClient
from shoal.tui.connection import Backoff
from shoal.tui.launcher import start_node
from shoal.tui.widgets.status import StatusBar
from textual.widgets import Input

from tests.tui.node_proc import TestNode
from tests.tui.pilot_util import SIZE, capture_notices, make_app, wait_until


async def test_app_survives_node_restart(tmp_path: Path) -> None:
    node = TestNode(tmp_path / "node", env={"SHOAL_MODELS_PRELOAD": "false"}).start()
    try:
        app = make_app(node.url)
        async with app.run_test(size=SIZE) as pilot:
            status = app.query_one(StatusBar)
            await wait_until(pilot, lambda: status.state == "connected", "the first connection")
            await pilot.press("5")
            floor = app.query_one("#policy-battery_floor", Input)
            await wait_until(pilot, lambda: floor.value != "", "the policy")
            default_floor = floor.value
            client = NodeClient(node.url)
            await client.set_policy(battery_floor=77)  # a change made elsewhere reaches the TUI as an event
            await client.close()
            await wait_until(pilot, lambda: floor.value == "77", "the policy.changed event")

            await asyncio.to_thread(node.stop)
            await wait_until(pilot, lambda: status.state == "disconnected", "disconnected")
            await pilot.press("r", "2", "3", "1", "5")  # keys still work while the node is away
            await pilot.pause(0.5)
            assert app.is_running and status.state == "disconnected"

            await asyncio.to_thread(node.start)
            await wait_until(pilot, lambda: status.state == "connected", "the reconnection")
            # the restarted node has its configured policy again; the TUI reloaded it on reconnecting
            await wait_until(pilot, lambda: floor.value == default_floor, "the reloaded policy")
    finally:
        node.stop()


async def test_says_when_the_node_it_started_exits(tmp_path: Path) -> None:
    with socket.socket() as taken:  # something else holds the port, so the started node cannot listen
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"http://127.0.0.1:{taken.getsockname()[1]}"
        started = start_node(url, ["--data-dir", str(tmp_path / "n"), "--backend", "tvm"], log_dir=tmp_path)
        try:
            app = ShoalApp(url, "started a node", backoff=Backoff(first=0.2, cap=0.5), started_node=started)
            told = capture_notices(app)
            async with app.run_test(size=SIZE) as pilot:
                await wait_until(pilot, lambda: any("exited" in m for m in told), "the notice", within=60)
                assert app.query_one(StatusBar).state == "disconnected"
                assert str(started.log_path) in next(m for m in told if "exited" in m)
        finally:
            started.stop()
