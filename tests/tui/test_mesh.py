"""The Mesh tab against two real nodes on loopback: copy one node's invite, join it from the other's TUI,
and watch the peer and the link appear."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from shoal.tui.client import NodeClient
from shoal.tui.screens.prompt import PromptScreen
from shoal.tui.widgets.topology import TopologyView
from textual.widgets import DataTable, Input, Static

from tests.tui.node_proc import TestNode
from tests.tui.pilot_util import SIZE, make_app, table_text, wait_until

LOOPBACK_MESH = {
    "SHOAL_MESH_ICE_INTERFACES": "lo",
    "SHOAL_MESH_MDNS": "false",
    "SHOAL_MODELS_PRELOAD": "false",
}


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[TestNode, TestNode]]:
    """`alpha` is in a mesh (it has a secret, so it can hand out invites); `beta` is in none yet."""
    alpha = TestNode(
        tmp_path / "alpha",
        env={**LOOPBACK_MESH, "SHOAL_NAME": "alpha", "SHOAL_MESH_SECRET": os.urandom(32).hex()},
    )
    beta = TestNode(tmp_path / "beta", env={**LOOPBACK_MESH, "SHOAL_NAME": "beta"})
    try:
        yield alpha.start(), beta.start()
    finally:
        beta.stop()
        alpha.stop()


async def test_invite_then_join_shows_the_peer_and_link(two_nodes: tuple[TestNode, TestNode]) -> None:
    alpha, beta = two_nodes
    client = NodeClient(alpha.url)
    try:
        invite = (await client.get("/v1/mesh/invite"))["invite"]
    finally:
        await client.close()

    app = make_app(alpha.url)
    async with app.run_test(size=SIZE) as pilot:
        peers = app.query_one("#peers", DataTable)
        await wait_until(pilot, lambda: "mesh " in str(peers.border_title), "alpha's mesh in the peers title")
        await pilot.press("i")
        shown = app.query_one("#invite", Static)
        await wait_until(pilot, lambda: invite in str(shown.render()), "the invite shown after copying it")
        assert f"/join#{invite}" in str(shown.render())  # the join page's URL, above its QR code
        assert "▀" in str(shown.render()) or "▄" in str(shown.render())

    app = make_app(beta.url)
    async with app.run_test(size=SIZE) as pilot:
        peers = app.query_one("#peers", DataTable)
        await wait_until(pilot, lambda: str(peers.border_title).startswith("Peers (0)"), "beta alone")
        await pilot.press("j")
        await wait_until(pilot, lambda: isinstance(app.screen, PromptScreen), "the join prompt")
        app.screen.query_one(Input).value = invite
        await pilot.press("enter")
        await wait_until(
            pilot, lambda: "alpha" in table_text(peers), "alpha in beta's peers table", within=60
        )
        await wait_until(pilot, lambda: "connected" in table_text(peers), "the link to come up", within=60)
        # what the link is: loopback, so a host-to-host ICE pair over UDP
        await wait_until(pilot, lambda: "host/udp" in table_text(peers), "the link kind in the table")
        topology = app.query_one(TopologyView)
        await wait_until(pilot, lambda: "1 link" in str(topology.render()), "the link in the topology")
        assert "beta (this node) ──" in str(topology.render())
        assert "── alpha" in str(topology.render())
