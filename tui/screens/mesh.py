"""Mesh tab: this node, its peers (link state, RTT, what the link is — host, hole-punched or relayed —, what
they hold and how fast they run, the work given to and received from each, from the signed usage receipts),
the topology, and what this node has warmed for its peers' likely plans (`split.warming`); join a mesh from
an invite and copy this node's invite (shown with the join page's URL and its QR code). A node the members
refused says so in red (who, why, when it tries again)."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from shoal.tui.client import NotAvailable
from shoal.tui.format import human_bytes, number, short_id
from shoal.tui.screens.base import NodePane
from shoal.tui.screens.prompt import PromptScreen
from shoal.tui.widgets.topology import TopologyView
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Static

PEER_COLUMNS = (
    "name",
    "id",
    "target",
    "state",
    "RTT ms",
    "link",
    "models",
    "shards",
    "tok/s",
    "free mem",
    "batt",
    "queue",
    "trusted",
    "given",
    "received",
)
_STATE_STYLE = {"connected": "green", "connecting": "yellow", "failed": "red", "closed": "red"}


def _work(requests: Any, tokens: Any) -> str:
    if not requests:
        return "—"
    return f"{requests} req / {tokens} tok"


_LINK_WORDS = {"host": "host", "server-reflexive": "srflx", "peer-reflexive": "prflx", "relayed": "relay"}


def link_cell(path: Any) -> Text | str:
    """What the link is (its selected ICE pair, `path` in `GET /v1/mesh/peers`): `host/udp`, `srflx/udp`
    (hole punched through a NAT), `relay/tcp` (through a TURN server, in yellow), or — before ICE chose."""
    if not isinstance(path, dict) or path.get("type") not in _LINK_WORDS:
        return "—"
    kind = _LINK_WORDS[path["type"]]
    return Text(f"{kind}/{path.get('protocol') or '?'}", style="yellow" if kind == "relay" else "")


def peer_row(peer: dict[str, Any], usage: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """One table row; `usage`: this peer's entry of `GET /v1/mesh/usage` (given = served by this node)."""
    advert = peer.get("advert") or {}
    work = usage or {}
    speed = advert.get("speed") or {}
    decode = [v.get("decode_tok_s") for v in speed.values() if isinstance(v, dict) and v.get("decode_tok_s")]
    state = str(peer.get("state") or "?")
    battery = advert.get("battery")
    return (
        peer.get("name") or "—",
        short_id(peer.get("id")),
        advert.get("target") or ("browser" if peer.get("kind") == "browser" else "—"),
        Text(state, style=_STATE_STYLE.get(state, "")),
        number(peer.get("rtt_ms"), 1),
        link_cell(peer.get("path")),
        ", ".join(advert.get("models") or []) or "—",
        str(len(advert.get("shards") or [])),
        number(max(decode), 1) if decode else "—",
        human_bytes(advert.get("free_memory")) if advert.get("free_memory") is not None else "—",
        f"{number(battery, 0)}%" if battery is not None else "—",
        str(advert.get("queue_depth", "—")),
        "yes" if peer.get("trusted") else "no",
        _work(work.get("given_requests"), work.get("given_tokens")),
        _work(work.get("received_requests"), work.get("received_tokens")),
    )


def refusal_line(standing: dict[str, Any] | None) -> Text | None:
    """The red line for `mesh` of `GET /v1/mesh/peers` while the members refuse this node, else None."""
    if not standing or standing.get("status") != "refused":
        return None
    retry = standing.get("retry_in_s")
    return Text.assemble(
        ("refused ", "bold red"),
        (f"by {standing.get('by') or '?'} ", "red"),
        (f"({standing.get('code') or '?'}): ", "red"),
        str(standing.get("reason") or ""),
        ("  next try in ", "dim"),
        f"{number(retry, 0)} s" if isinstance(retry, int | float) else "—",
        ("  refusals ", "dim"),
        str(standing.get("refusals") or 0),
    )


WARM_STATES = ("ready", "compiled", "warming")


def warming_line(warming: dict[str, Any] | None) -> Text | None:
    """What this node has prepared for its peers' likely plans (`warming` of `GET /v1/mesh/route`: spans
    loaded as idle stages, whole models loaded or compiled), or None when nothing is."""
    entries = [e for e in (warming or {}).get("entries") or [] if isinstance(e, dict)
               and e.get("state") in WARM_STATES]
    if not entries:
        return None
    parts: list[Any] = [("warm for peers ", "dim")]
    for i, entry in enumerate(entries[:6]):
        what = "whole" if entry.get("kind") == "model" else f"layers {entry.get('span')}"
        parts += [("  " if i else "", ""), (f"{entry.get('model')} {what}", "bold"),
                  (f" {entry.get('state')}", "green" if entry.get("state") != "warming" else "yellow"),
                  (f" for {short_id(str(entry.get('origin') or ''), 12)}", "dim")]
    if len(entries) > 6:
        parts.append((f"  +{len(entries) - 6} more", "dim"))
    return Text.assemble(*parts)


class MeshPane(NodePane):
    MAIN = "#peers"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "join", "Join mesh"),
        Binding("i", "invite", "Copy invite"),
    ]

    def compose(self) -> ComposeResult:
        yield self.compose_unavailable()
        yield Static("", id="mesh-self")
        standing = Static("", id="mesh-standing")
        standing.display = False
        yield standing
        warm = Static("", id="mesh-warming")
        warm.display = False
        yield warm
        # The invite sits at the top: toasts open at the bottom right and hid it when it was last.
        yield Static("", id="invite")
        table: DataTable[Any] = DataTable(id="peers", cursor_type="row", zebra_stripes=True)
        table.border_title = "Peers"
        yield table
        topo = TopologyView(id="topology")
        topo.border_title = "Topology"
        yield topo

    def on_mount(self) -> None:
        self.query_one("#peers", DataTable).add_columns(*PEER_COLUMNS)

    async def load(self) -> None:
        try:
            info = await self.client.node_info()
        except NotAvailable:
            info = dict((await self.client.health()).get("node") or {})
        self.query_one("#mesh-self", Static).update(
            Text.assemble(
                ("this node ", "dim"),
                (str(info.get("name") or "?"), "bold"),
                ("  id ", "dim"),
                str(info.get("id") or "?"),
                ("  target ", "dim"),
                str(info.get("target") or "—"),
                ("  version ", "dim"),
                str(info.get("version") or "—"),
            )
        )
        table = self.query_one("#peers", DataTable)
        topo = self.query_one(TopologyView)
        topo.self_id = str(info.get("id") or "")
        topo.names[topo.self_id] = str(info.get("name") or "")
        standing: dict[str, Any] | None = None
        try:
            view = await self.client.peers()
        except NotAvailable:
            table.border_title = "Peers — not available on this node"
            peers: list[dict[str, Any]] = []
        else:
            peers = list(view.get("peers") or [])
            standing = view.get("mesh") if isinstance(view.get("mesh"), dict) else None
            own = view.get("self") or {}
            mesh_id, mesh_name = own.get("mesh"), own.get("mesh_name")
            named = f"{mesh_name} " if mesh_name else ""
            where = f"mesh {named}{short_id(str(mesh_id), 20)}" if mesh_id else "not in a mesh (j: join)"
            table.border_title = f"Peers ({len(peers)}) — {where}"
        refusal = refusal_line(standing)
        line = self.query_one("#mesh-standing", Static)
        line.display = refusal is not None
        line.update(refusal or "")
        try:
            warm = warming_line((await self.client.route()).get("warming"))
        except NotAvailable:
            warm = None
        warm_line = self.query_one("#mesh-warming", Static)
        warm_line.display = warm is not None
        warm_line.update(warm or "")
        usage: dict[str, Any] = {}
        if peers:
            try:
                usage = dict((await self.client.usage()).get("peers") or {})
            except NotAvailable:
                usage = {}
        table.clear()
        for peer in peers:
            topo.names[str(peer.get("id"))] = str(peer.get("name") or short_id(peer.get("id"), 10))
            table.add_row(*peer_row(peer, usage.get(str(peer.get("id")))), key=str(peer.get("id")))
        try:
            topo.topology = await self.client.topology()
        except NotAvailable:
            topo.topology = None

    def on_node_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind.startswith(("peer.", "mesh.")) or kind in ("request.started", "request.finished"):
            self.reload()

    def action_join(self) -> None:
        def joined(invite: str | None) -> None:
            if invite:
                self.run_action(self._join(invite), "join")

        self.app.push_screen(PromptScreen("Join a mesh: paste an invite", "shoal-invite…"), joined)

    async def _join(self, invite: str) -> None:
        result = await self.client.join(invite)
        self.notify(f"joined mesh {result.get('mesh', '')}".strip(), title="mesh")
        self.reload()

    def action_invite(self) -> None:
        self.run_action(self._copy_invite(), "invite")

    async def _copy_invite(self) -> None:
        view = await self.client.invite_view()
        invite, url = str(view.get("invite", "")), view.get("url")
        self.app.copy_to_clipboard(invite)
        shown = Text.assemble(("invite ", "bold"), invite)
        if url:  # a phone that scans the QR code opens the join page and becomes a member in its browser
            shown.append_text(Text.assemble("\n", ("join page ", "bold"), str(url), " — scan on a phone:\n"))
            shown.append(str(view.get("qr") or ""))
        self.query_one("#invite", Static).update(shown)
        self.notify("invite copied to the clipboard (and shown above the peers)", title="mesh")
