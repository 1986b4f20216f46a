"""Adverts: what each node holds and can do, sent to every peer periodically and on change.

An advert is a JSON object (at most 64 KiB) with: `name`, `api`, `models` (list), `shards` (the spans the
node holds loaded: `clean_shards`),
`target`, `speed` ({model: {"prefill_tok_s", "decode_tok_s"}}), `roots` (CIDs of held DAGs), `gateway` (bool),
`free_memory` (bytes), `queue_depth`, `battery` (percent or null), `plugged` (bool or null), `thermal` (max °C
or null), `links` ({peer_id: rtt_ms}), `split` (the split layer's offer) and `kind` (`node`, or `browser`
for a tab that joined through `GET /join`). Other layers set their fields with
`MeshService.gossip.update(...)`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import psutil
from shoal.mesh.p2p import protocol as p
from shoal.mesh.p2p.errors import MeshError
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.ports import GossipHost

logger = logging.getLogger(__name__)
LIST_FIELDS = ("models", "roots")
MAX_LIST = 256
MAX_SHARDS = 64
"""Most `shards` entries an advert carries (more are dropped on receipt)."""
MAX_LAYER = 1 << 16
MAX_SHARD_BYTES = 1 << 50
MEMBER_KINDS = ("node", "browser")
"""What a member is (`kind` in adverts): a `shoal node`, or a browser tab (`GET /join`)."""


def system_state() -> dict[str, Any]:
    """Free memory, battery and thermal state as far as psutil can tell on this OS."""
    free = psutil.virtual_memory().available
    state: dict[str, Any] = {
        "free_memory": free,
        "battery": None,
        "plugged": None,
        "thermal": None,
    }
    try:
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        if battery is not None:
            state["battery"] = round(battery.percent, 1)
            state["plugged"] = bool(battery.power_plugged)
    except (OSError, RuntimeError):
        pass
    try:
        temps = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
        readings = [t.current for entries in temps.values() for t in entries if t.current]
        if readings:
            state["thermal"] = round(max(readings), 1)
    except (OSError, RuntimeError):
        pass
    return state


def _shard(entry: Any) -> dict[str, Any] | None:
    """One well-formed `shards` entry, or None."""
    if not isinstance(entry, dict):
        return None
    model, cid, start, stop = entry.get("model"), entry.get("cid"), entry.get("start"), entry.get("stop")
    nbytes = entry.get("bytes")
    if not isinstance(model, str) or not 0 < len(model) <= 200:
        return None
    if cid is not None and (not isinstance(cid, str) or not 0 < len(cid) <= 128 or not cid.isalnum()):
        return None
    if type(start) is not int or type(stop) is not int or not 0 <= start < stop <= MAX_LAYER:
        return None
    if type(nbytes) is not int or not 0 <= nbytes <= MAX_SHARD_BYTES:
        return None
    return {"model": model, "cid": cid, "start": start, "stop": stop, "bytes": nbytes,
            "idle": entry.get("idle") is True}


def clean_shards(value: Any, peer_id: str = "") -> list[dict[str, Any]]:
    """An advert's `shards` — the spans a member holds loaded (`mesh.split.held_spans`), each
    `{"model", "cid" (or null), "start", "stop", "bytes", "idle"}` — with junk entries skipped and logged, and
    at most `MAX_SHARDS` kept; anything but a list reads as none."""
    items = value if isinstance(value, list) else []
    kept = [shard for shard in map(_shard, items[:MAX_SHARDS]) if shard is not None]
    skipped = (len(items) - len(kept)) if isinstance(value, list) else int(value is not None)
    if skipped:
        logger.info("advert of %s: %d shards entr%s skipped (malformed, or past the %d kept)",
                    peer_id[:12] or "?", skipped, "y" if skipped == 1 else "ies", MAX_SHARDS)
    return kept


def clean_advert(body: dict[str, Any], peer_id: str = "") -> dict[str, Any]:
    """Keep only well-typed advert fields from a peer (drop the rest); raise `ProtocolError` if hopeless."""
    advert: dict[str, Any] = {}
    for key in LIST_FIELDS:
        value = body.get(key, [])
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise p.ProtocolError(f"advert field {key} must be a list of at most {MAX_LIST}")
        advert[key] = [item for item in value if isinstance(item, str | dict)]
    advert["shards"] = clean_shards(body.get("shards"), peer_id)
    for key in ("name", "api", "target"):
        if isinstance(body.get(key), str):
            advert[key] = body[key][:200]
    for key in ("free_memory", "queue_depth", "thermal", "battery"):
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            advert[key] = value
    for key in ("speed", "links", "split"):  # split: see mesh.split_service
        if isinstance(body.get(key), dict):
            advert[key] = body[key]
    advert["gateway"] = body.get("gateway") is True
    advert["kind"] = body["kind"] if body.get("kind") in MEMBER_KINDS else "node"
    if isinstance(body.get("plugged"), bool):
        advert["plugged"] = body["plugged"]
    return advert


class Gossip:
    def __init__(self, service: GossipHost) -> None:
        self.service = service
        self.fields: dict[str, Any] = {"models": [], "shards": [], "roots": [], "speed": {}, "queue_depth": 0}
        self._providers: list[Callable[[], dict[str, Any]]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        service.on_control("advert", self._on_advert)
        service.add_peer_listener(self._on_peer)

    def add_provider(self, provider: Callable[[], dict[str, Any]]) -> None:
        """`provider()` is called for every advert and its fields merged in (keep it cheap)."""
        self._providers.append(provider)

    def update(self, **fields: Any) -> None:
        """Set advert fields (e.g. `models=[...]`, `speed={...}`); peers hear about it promptly."""
        self.fields.update(fields)
        self._changed.set()

    def advert(self) -> dict[str, Any]:
        # the RTT alone: a peer's full summary() also walks the host's interfaces (its ICE path), ~1 ms a peer
        links = {peer.peer_id: peer.rtt_ms for peer in self.service.connected_peers()}
        provided: dict[str, Any] = {}
        for provider in self._providers:
            provided.update(provider())
        return {
            **self.fields,
            **provided,
            "kind": "node",
            "name": self.service.identity.name,
            "api": self.service.advertise_address,
            "links": links,
            **system_state(),
        }

    async def start(self) -> None:
        self._task = self.service.spawn(self._run(), name="gossip")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _on_peer(self, event: str, peer: Peer) -> None:
        self._changed.set()  # our links changed: everyone's topology view should hear of it
        if event == "joined":
            self.service.spawn(self._send(peer, self.advert()), name="advert")

    async def _send(self, peer: Peer, advert: dict[str, Any]) -> None:
        try:
            await peer.notify("advert", advert)
        except MeshError as exc:
            logger.debug("advert to %s not sent: %s", peer.peer_id[:12], exc)

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.service.config.gossip_interval_s):
                    await self._changed.wait()
                await asyncio.sleep(0.1)  # let a burst of updates settle into one advert
            except TimeoutError:
                pass
            self._changed.clear()
            advert = self.advert()
            await asyncio.gather(*(self._send(peer, advert) for peer in self.service.connected_peers()))

    async def _on_advert(self, peer: Peer, frame: p.ControlFrame) -> None:
        previous = peer.advertised(clean_advert(frame.body, peer.peer_id))
        if _stable(previous) != _stable(peer.advert):  # not on every memory/RTT wiggle: keep the bus calm
            self.service.events.publish(
                "peer.updated", id=peer.peer_id, name=peer.name, models=peer.advert.get("models", [])
            )


VOLATILE = frozenset({"free_memory", "links", "thermal", "battery", "queue_depth"})


def _stable(advert: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in advert.items() if key not in VOLATILE}
