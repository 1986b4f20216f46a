"""A text drawing of the mesh: this node, its links with RTT, and the stages of running pipelines."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from shoal.tui.format import number, short_id
from textual.reactive import reactive
from textual.widgets import Static


def _span(span: Any) -> str:
    if isinstance(span, list | tuple) and len(span) == 2:
        return f"[{span[0]}:{span[1]})"
    if isinstance(span, dict):
        return f"[{span.get('start', '?')}:{span.get('end', '?')})"
    return str(span)


def draw_topology(topology: dict[str, Any], names: dict[str, str], self_id: str) -> Text:
    """Render nodes, links and pipelines as lines of text (pure: tested without an app)."""

    names = dict(names)
    self_id = self_id or str(topology.get("self") or "")
    nodes: list[str] = []
    browsers: set[str] = set()
    for node in topology.get("nodes") or []:
        node_id = str(node.get("id", "?")) if isinstance(node, dict) else str(node)
        nodes.append(node_id)
        if isinstance(node, dict) and node.get("name"):
            names.setdefault(node_id, str(node["name"]))
        if isinstance(node, dict) and node.get("kind") == "browser":
            browsers.add(node_id)

    def name(node_id: str) -> str:
        label = names.get(node_id) or short_id(node_id, 10)
        if node_id in browsers:  # a browser tab that joined through GET /join
            label += " (browser)"
        return f"{label} (this node)" if node_id == self_id else label

    text = Text()
    links = topology.get("links") or []
    pipelines = topology.get("pipelines") or []
    text.append(
        f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, {len(links)} link"
        f"{'s' if len(links) != 1 else ''}\n",
        style="bold",
    )
    linked: set[str] = set()
    for link in links:
        a, b = str(link.get("a", "?")), str(link.get("b", "?"))
        if b == self_id:  # this node reads first
            a, b = b, a
        linked.update((a, b))
        text.append(f"  {name(a)} ", style="cyan")
        text.append(f"──{number(link.get('rtt_ms'), 1, ' ms')}──", style="dim")
        text.append(f" {name(b)}\n", style="cyan")
    for node in nodes:
        if node not in linked:
            text.append(f"  {name(node)}", style="cyan")
            text.append("  (no links)\n", style="dim")
    if pipelines:
        text.append("pipelines\n", style="bold")
    for pipe in pipelines:
        text.append(f"  {short_id(str(pipe.get('request', '?')), 14)}: ", style="magenta")
        stages = [f"{name(str(s.get('peer', '?')))}{_span(s.get('span'))}" for s in pipe.get("stages") or []]
        text.append(" → ".join(stages) + "\n")
    return text


class TopologyView(Static):
    """Shows `draw_topology` of the latest `/v1/mesh/topology`; set `topology` to redraw."""

    topology: reactive[dict[str, Any] | None] = reactive(None, always_update=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names: dict[str, str] = {}
        self.self_id = ""

    def watch_topology(self, topology: dict[str, Any] | None) -> None:
        if topology is None:
            self.update(Text("topology: not available on this node", style="dim"))
        else:
            self.update(draw_topology(topology, self.names, self.self_id))
