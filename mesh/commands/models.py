"""`shoal models`: the models this node knows (catalog) and holds (pinned), with sizes."""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection

from shoal.mesh.commands.cli import CommandError
from shoal.mesh.commands.node_client import data_dir
from shoal.mesh.ipfs.cli_support import add_data_dir_option, human_bytes
from shoal.mesh.ipfs.config import IpfsConfig
from shoal.mesh.ipfs.errors import IpfsError
from shoal.mesh.ipfs.service import IpfsService


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
    stats = service.store.stats()
    if args.json:
        store = {"blocks": stats.blocks, "bytes": stats.bytes}
        print(json.dumps({"models": models, "store": store}, indent=1))
        return 0
    rows = [("NAME", "CID", "SIZE", "STATE")]
    for m in models:
        size = human_bytes(m["size"]) if m["size"] else "-"
        state = "pinned" if m["pinned"] and m["complete"] else ("partial" if m["pinned"] else "remote")
        rows.append((", ".join(m["names"]) or "-", m["cid"], size, state))
    print_table(rows, right_aligned={2})
    print(f"store: {stats.blocks} blocks, {human_bytes(stats.bytes)}")
    return 0
