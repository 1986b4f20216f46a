"""The Mesh tab of a node whose invite the members refuse: a real `shoal node` with an expired invite whose
bootstrap is a real member (the mesh harness) on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from shoal.mesh.p2p.invite import Invite
from shoal.tui.screens.mesh import refusal_line
from textual.widgets import Static

from tests.mesh.mesh_nodes import Node, free_port
from tests.tui.node_proc import TestNode
from tests.tui.pilot_util import SIZE, make_app, wait_until


def test_refusal_line_only_while_refused():
    assert refusal_line(None) is None
    assert refusal_line({"status": "linked", "refusals": 0}) is None
    line = refusal_line(
        {
            "status": "refused",
            "by": "10.0.0.2:8740",
            "code": "invite_expired",
            "reason": "expired at X",
            "retry_in_s": 12.4,
            "refusals": 3,
        }
    )
    assert line is not None
    assert (
        line.plain == "refused by 10.0.0.2:8740 (invite_expired): expired at X  next try in 12 s  refusals 3"
    )


@pytest.fixture
def refused_node(tmp_path: Path) -> Iterator[TestNode]:
    invite = Invite.create("tui")
    member = Node(
        "member",
        tmp_path / "member",
        f"127.0.0.1:{free_port()}",
        ["--invite", invite.to_token(), "--ice", "lo", "--no-mdns"],
    ).start()
    expired = invite.expiring(int(time.time()) - 60).with_bootstrap((member.api,))
    env = {
        "SHOAL_MESH_ICE_INTERFACES": "lo",
        "SHOAL_MESH_MDNS": "false",
        "SHOAL_MODELS_PRELOAD": "false",
        "SHOAL_MESH_INVITE": expired.to_token(),
    }
    node = TestNode(tmp_path / "late", env=env)
    try:
        yield node.start()
    finally:
        node.stop()
        member.kill(15)


async def test_mesh_tab_shows_the_refusal(refused_node: TestNode) -> None:
    app = make_app(refused_node.url)
    async with app.run_test(size=SIZE) as pilot:
        line = app.query_one("#mesh-standing", Static)
        await wait_until(
            pilot, lambda: line.display and "invite_expired" in str(line.render()), "the refusal"
        )
        assert "expired" in str(line.render()) and "next try in" in str(line.render())
