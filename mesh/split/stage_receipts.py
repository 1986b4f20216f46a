"""Receipts for the stages of a split: the origin's side (`StageReceipts.sink`, handed to each `RemoteStage`)
and the server's (`accept`, the `stage.receipt` handler).

A hosted sequence's receipt comes back in the `stage.close` reply (`split.stage_host`); the origin checks it
against what its `RemoteStage` sent (rows prefilled, decode steps), countersigns and keeps it, and sends it
back as `stage.receipt` for the server to keep. `RemoteStage` closes sequences on an executor thread, so the
sink only hands the work to the event loop, where a task owned by the mesh service does it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shoal.mesh.p2p.errors import MeshError, RemoteError
from shoal.mesh.p2p.peer import Peer
from shoal.mesh.p2p.protocol import ControlFrame
from shoal.mesh.split import wire
from shoal.mesh.split.ports import MeshHandle
from shoal.mesh.split.receipts import Expected, ReceiptError, UsageLedger
from shoal.mesh.split.stage_link import StageSeen

logger = logging.getLogger(__name__)


class StageReceipts:
    def __init__(self, mesh: MeshHandle, ledger: UsageLedger) -> None:
        self._mesh = mesh
        self._ledger = ledger
        self._loop: asyncio.AbstractEventLoop | None = None
        mesh.on_control(wire.STAGE_RECEIPT, self._on_receipt)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def sink(self, seen: StageSeen, receipt: Any) -> None:
        """Thread-safe: countersign `receipt` on the loop (a task owned by the mesh service)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._spawn, seen, receipt)

    def _spawn(self, seen: StageSeen, receipt: Any) -> None:
        self._mesh.spawn(self._countersign(seen, receipt), name=f"stage receipt {seen.seq}")

    async def _countersign(self, seen: StageSeen, receipt: Any) -> None:
        usage = receipt.get("usage") if isinstance(receipt, dict) else None
        model = usage.get("model") if isinstance(usage, dict) else None
        expected = Expected(seen.peer, f"stage-{seen.seq}", "stage",
                            model if model in seen.models else min(seen.models, default=""),
                            seen.tokens_in, seen.tokens_out)
        try:
            signed = await self._ledger.countersign(expected, receipt)
            await self._mesh.peer(seen.peer).request(wire.STAGE_RECEIPT, {"receipt": signed.to_dict()})
        except (ReceiptError, MeshError) as exc:
            logger.warning("stage seq %d: receipt from %s not countersigned: %s", seen.seq, seen.peer[:12],
                           exc)

    async def _on_receipt(self, peer: Peer, frame: ControlFrame) -> dict[str, Any]:
        """The origin's countersigned copy of a stage receipt this node issued: kept if it is that one."""
        try:
            await self._ledger.accept(peer.peer_id, frame.body.get("receipt"))
        except ReceiptError as exc:
            raise RemoteError(wire.BAD_REQUEST, str(exc)[:300]) from None
        return {}
