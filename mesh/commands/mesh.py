"""`shoal mesh`: create a mesh (print an invite and its QR code), show a running node's invite, join one."""

from __future__ import annotations

import argparse
from pathlib import Path

from shoal.mesh.commands.cli import CommandError
from shoal.mesh.commands.node_client import call
from shoal.mesh.p2p.errors import InviteError
from shoal.mesh.p2p.invite import Invite, render_qr, save_invite


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mesh", help="create, show or join a mesh", description=__doc__)
    sub = parser.add_subparsers(dest="mesh_command", metavar="ACTION", required=True)

    create = sub.add_parser("create", help="make a new mesh secret and print its invite (and QR code)")
    create.add_argument("--name", default="shoal", help="the mesh's human name (default: %(default)s)")
    create.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="API address of a member others should contact first (repeatable)",
    )
    create.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="also save the invite in this node data dir, so `shoal node` joins it",
    )
    create.add_argument("--no-qr", action="store_true", help="print the token only")
    create.set_defaults(handler=run_create)

    invite = sub.add_parser("invite", help="print the invite of the mesh a running node is in")
    invite.add_argument("--api", metavar="URL", help="node to ask (default: the configured address)")
    invite.add_argument("--no-qr", action="store_true", help="print the token only")
    invite.set_defaults(handler=run_invite)

    join = sub.add_parser("join", help="make a running node join a mesh")
    join.add_argument("invite", help="the invite token (shoal1-...)")
    join.add_argument("--api", metavar="URL", help="node to tell (default: the configured address)")
    join.set_defaults(handler=run_join)


def _show(token: str, qr: bool) -> None:
    print(token)
    if qr:
        print()
        print(render_qr(token), end="")
        print("Scan on a phone, or paste the token into `shoal node --join` / `shoal mesh join`.")


def run_create(args: argparse.Namespace) -> int:
    try:
        invite = Invite.create(args.name, tuple(args.bootstrap))
    except InviteError as exc:
        raise CommandError(str(exc)) from None
    if args.data_dir is not None:
        save_invite(args.data_dir, invite)
    _show(invite.to_token(), not args.no_qr)
    return 0


def run_invite(args: argparse.Namespace) -> int:
    body = call(args.api, "/v1/mesh/invite")
    _show(body["invite"], not args.no_qr)
    return 0


def run_join(args: argparse.Namespace) -> int:
    try:
        Invite.from_token(args.invite)
    except InviteError as exc:
        raise CommandError(str(exc)) from None
    body = call(args.api, "/v1/mesh/join", {"invite": args.invite})
    print(f"joined mesh {body['mesh']}; contacting {', '.join(body['bootstrap']) or 'no bootstrap address'}")
    return 0
