"""`shoal models`: the models this node knows (catalog) and holds (pinned), with sizes, and for the files it
holds their architecture, quantization, parameter count, trained context and the memory a whole-model
stage needs with the default KV cache (2,048 tokens). STORE says what the block store has (pinned, partial,
remote); STATE what the running node does with it (loaded, loading, available), asked of the node at
`--api` (default: the configured address) — `-` when no node answers."""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection

from shoal.mesh.commands.cli import CommandError
from shoal.mesh.commands.node_client import call, data_dir
from shoal.mesh.ipfs.cli_support import add_data_dir_option, human_bytes
from shoal.mesh.ipfs.config import IpfsConfig
from shoal.mesh.ipfs.errors import IpfsError
from shoal.mesh.ipfs.service import IpfsService
from shoal.models.errors import ModelError
from shoal.models.memory import describe

SUMMARY_TOKENS = 2048
"""KV-cache tokens the MEM column assumes (CompiledStage's default)."""
NODE_TIMEOUT_S = 3.0
"""How long to wait for the running node's model states."""


def node_states(api: str | None) -> dict[str, str] | None:
    """Model name or CID -> `loaded` / `loading` / `available` from the running node's `GET /v1/models`;
    None when no node answers."""
    try:
        listing = call(api, "/v1/models", timeout=NODE_TIMEOUT_S)
    except CommandError:
        return None
    states: dict[str, str] = {}
    for entry in listing.get("data") or [] if isinstance(listing, dict) else []:
        meta = entry.get("shoal") or {} if isinstance(entry, dict) else {}
        state = str(meta.get("state") or ("loaded" if meta.get("loaded") else "available"))
        for key in (entry.get("id"), meta.get("cid")):
            if isinstance(key, str) and (key not in states or state != "available"):
                states[key] = state
    return states


def _state_of(model: dict[str, object], states: dict[str, str] | None) -> str:
    if states is None:
        return "-"
    names = [str(n) for n in model.get("names") or []]  # type: ignore[attr-defined]
    found = [states[k] for k in [*names, str(model.get("cid"))] if k in states]
    return next((s for s in found if s != "available"), found[0] if found else "-")


def _summary(path: str | None) -> dict[str, object] | None:
    """The file's `models.memory` summary, or None when it is absent or unreadable."""
    if path is None:
        return None
    try:
        return describe(path, tokens=SUMMARY_TOKENS)
    except (ModelError, OSError):
        return None


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}" if n < 10 * scale else f"{n / scale:.0f}{unit}"
    return str(n)


def print_table(rows: list[tuple[str, ...]], right_aligned: Collection[int] = ()) -> None:
    """Columns as wide as their widest cell (long model names no longer push the others out of line)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.rjust(w) if i in right_aligned else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list known and local models", description=__doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--unpin", metavar="CID|NAME", action="append", default=[],
                        help="unpin a model (its blocks go at the next --gc)")
    parser.add_argument("--gc", action="store_true", help="delete blocks that no pinned model needs")
    parser.add_argument("--api", metavar="HOST:PORT",
                        help="the running node to ask for model states (default: the configured address)")
    add_data_dir_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    service = IpfsService(IpfsConfig(), data_dir(args.data_dir))
    try:
        for name in args.unpin:
            if not service.store.unpin(service.catalog.resolve(name)):
                raise CommandError(f"{name} is not pinned")
            print(f"unpinned {name}")
    except IpfsError as exc:
        raise CommandError(str(exc)) from None
    if args.gc:
        freed = service.store.gc()
        print(f"gc: freed {freed.blocks} blocks, {human_bytes(freed.bytes)}")
    models = service.list_models()
    states = node_states(args.api)
    for m in models:
        m["summary"] = _summary(m.get("path"))
        m["state"] = None if states is None else _state_of(m, states)
    stats = service.store.stats()
    if args.json:
        store = {"blocks": stats.blocks, "bytes": stats.bytes}
        print(json.dumps({"models": models, "store": store, "node": states is not None}, indent=1))
        return 0
    rows = [("NAME", "CID", "SIZE", "STORE", "STATE", "ARCH", "QUANT", "PARAMS", "CTX", "MEM@2k")]
    for m in models:
        size = human_bytes(m["size"]) if m["size"] else "-"
        stored = "pinned" if m["pinned"] and m["complete"] else ("partial" if m["pinned"] else "remote")
        info = m["summary"]
        details = ((str(info["architecture"]), str(info["quantization"]), _count(int(info["parameters"])),
                    str(info["context_length"]), human_bytes(int(info["memory_bytes"])))
                   if info else ("-",) * 5)
        rows.append((", ".join(m["names"]) or "-", m["cid"], size, stored, m["state"] or "-", *details))
    print_table(rows, right_aligned={2, 7, 8, 9})
    print(f"store: {stats.blocks} blocks, {human_bytes(stats.bytes)}")
    if states is None:
        print("STATE: no node answers (start one with `shoal node`, or name it with --api)")
    return 0
