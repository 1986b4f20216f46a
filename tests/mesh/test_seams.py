"""The product's objects have every member of the Protocols at the seams they are handed across (the node to
the API and to split, the mesh service to split, IPFS, discovery and gossip, the router to the API), so a
rename on one side cannot silently leave a Protocol behind. Names only: signatures are the type checker's."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol

import pytest
from shoal.mesh.api import ports as api_ports
from shoal.mesh.api.records import RequestRecord
from shoal.mesh.ipfs.block_exchange import MeshLinks
from shoal.mesh.node.config import NodeConfig
from shoal.mesh.node.node import Node, build_node
from shoal.mesh.p2p.ports import DiscoveryHost, GossipHost, LinkHost
from shoal.mesh.split import ports as split_ports
from shoal.mesh.split.remote_model import RemoteModel
from shoal.models.served import Servable, ServedModel


def _members(protocol: type) -> set[str]:
    names: set[str] = set()
    for base in protocol.__mro__:
        if base is Protocol or not getattr(base, "_is_protocol", False):
            continue
        names |= {name for name in vars(base) if not name.startswith("_")}
        names |= {name for name in getattr(base, "__annotations__", {}) if not name.startswith("_")}
    return names


def _missing(obj: Any, protocol: type) -> list[str]:
    missing = []
    for name in sorted(_members(protocol)):
        try:
            inspect.getattr_static(obj, name)
        except AttributeError:
            missing.append(name)
    return missing


@pytest.fixture
async def node(tmp_path: Path) -> Node:
    built = build_node(NodeConfig(name="seams", data_dir=tmp_path))
    yield built  # type: ignore[misc]
    await built.stop()


async def test_the_product_has_every_member_of_each_seam(node: Node) -> None:
    assert node.router is not None
    pairs: list[tuple[Any, type]] = [
        (node, api_ports.NodePort),
        (node.config, api_ports.NodeSettings),
        (node.config.api, api_ports.ApiSettings),
        (node.config.models, api_ports.ModelSettings),
        (node.models, api_ports.Models),
        (node.requests, api_ports.RequestLog),
        (node.log_bridge, api_ports.LogLines),
        (node.policy, api_ports.Policy),
        (node.router, api_ports.RouterPort),
        (node, split_ports.NodeView),
        (node.config, split_ports.NodeSettings),
        (node.config.models, split_ports.ModelSettings),
        (node.models, split_ports.NodeModels),
        (node.ipfs, split_ports.SpanFetcher),
        (node.mesh, split_ports.MeshHandle),
        (RequestRecord(id="r", model="m"), split_ports.Observed),
        (node.mesh, MeshLinks),
        (node.mesh, GossipHost),
        (node.mesh, DiscoveryHost),
        (node.mesh, LinkHost),
    ]
    gaps = {f"{type(obj).__name__} as {proto.__name__}": _missing(obj, proto) for obj, proto in pairs}
    assert {seam: names for seam, names in gaps.items() if names} == {}


def test_served_models_have_every_member_of_servable() -> None:
    for cls in (ServedModel, RemoteModel):
        fields = set(getattr(cls, "__dataclass_fields__", {}))
        missing = [name for name in _members(Servable) if name not in fields and not hasattr(cls, name)]
        assert missing == [], f"{cls.__name__} lacks {missing}"


def test_a_missing_member_is_found() -> None:
    class Thin:
        def describe(self) -> dict[str, Any]:
            return {}

    assert "describe" not in _missing(Thin(), api_ports.NodePort)
    assert {"models", "set_policy", "draining"} <= set(_missing(Thin(), api_ports.NodePort))
