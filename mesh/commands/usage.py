"""`shoal usage`: work this node served for its peers and they for it, from its signed receipts.

    shoal usage [--data-dir DIR] [--json]      per-peer totals (given = served by this node)
    shoal usage export [--data-dir DIR]         the receipts as JSON Lines, on stdout
    shoal usage verify FILE                     check every signature in a receipts file, public keys alone
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shoal.mesh.commands.cli import CommandError
from shoal.mesh.node.config import ConfigError, load_config
from shoal.mesh.p2p.errors import IdentityError
from shoal.mesh.p2p.identity import KEY_FILE, Identity
from shoal.mesh.split.receipts import Receipt, ReceiptError, ReceiptLog, totals, verify_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("usage", help="work served between this node and its peers (receipts)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=("totals", "export", "verify"), default="totals")
    parser.add_argument("file", nargs="?", type=Path, help="with verify: the receipts file to check")
    parser.add_argument("--data-dir", type=Path, help="the node's data dir (default: the configured one)")
    parser.add_argument("--json", action="store_true", help="machine-readable totals")
    parser.add_argument("--peer", metavar="ID", help="whose view the totals take (default: this node)")
    parser.set_defaults(handler=run)


def _data_dir(data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir
    try:
        return load_config().data_dir
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def _own_id(data_dir: Path, receipts: list[Receipt]) -> str:
    """The node's peer id from its identity key (never created here), else the id common to its receipts."""
    if (data_dir / "identity" / KEY_FILE).exists():
        try:
            return Identity.load_or_create(data_dir).peer_id
        except IdentityError as exc:
            raise CommandError(str(exc)) from None
    common = set.intersection(*({r.usage.server, r.usage.client} for r in receipts)) if receipts else set()
    return min(common) if len(common) == 1 else ""


def run(args: argparse.Namespace) -> int:
    if args.action == "verify":
        if args.file is None:
            raise CommandError("usage verify needs the receipts file to check")
        try:
            good, problems = verify_file(args.file)
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from None
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{good} receipts verify, {len(problems)} do not")
        return 1 if problems else 0
    data_dir = _data_dir(args.data_dir)
    path = ReceiptLog.in_data_dir(data_dir, "").path
    if not path.exists():
        print(f"no receipts yet ({path})")
        return 0
    if args.action == "export":
        sys.stdout.write(path.read_text())
        return 0
    try:
        receipts = list(ReceiptLog(path, "").receipts())
    except ReceiptError as exc:
        raise CommandError(f"{path}: {exc}") from None
    me = args.peer or _own_id(data_dir, receipts)
    if not me:
        raise CommandError("cannot tell which peer this log belongs to; name it with --peer ID")
    by_peer = totals(receipts, me)
    if args.json:
        print(json.dumps({"self": me, "peers": {p: t.to_dict() for p, t in by_peer.items()}}, indent=1))
        return 0
    print(f"{'PEER':20} {'GIVEN req':>9} {'GIVEN tok':>10} {'RECV req':>9} {'RECV tok':>10}")
    for peer, t in sorted(by_peer.items()):
        print(f"{peer[:20]:20} {t.given_requests:>9} {t.given_tokens:>10} {t.received_requests:>9} "
              f"{t.received_tokens:>10}")
    return 0
