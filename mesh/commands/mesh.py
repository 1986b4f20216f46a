"""`shoal mesh`: create a mesh (print an invite and its QR code), show a running node's invite (optionally
one that expires), join one, leave it, rotate the mesh secret, print a TURN relay's settings."""

from __future__ import annotations

import argparse
import re
import time
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
    create.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="URL",
        help="a STUN/TURN server the invite names (stun:host:port, turn:host:port?transport=tcp; repeatable)",
    )
    create.add_argument("--no-qr", action="store_true", help="print the token only")
    create.set_defaults(handler=run_create)

    relay = sub.add_parser(
        "relay", help="print coturn settings for a TURN relay of a mesh (credentials derived from its secret)"
    )
    relay.add_argument("invite", help="an invite holding the mesh secret (not an expiring one)")
    relay.add_argument("--realm", default="shoal", help="the TURN realm (default: %(default)s)")
    relay.set_defaults(handler=run_relay)

    invite = sub.add_parser("invite", help="print the invite of the mesh a running node is in")
    invite.add_argument("--api", metavar="URL", help="node to ask (default: the configured address)")
    invite.add_argument("--no-qr", action="store_true", help="print the token only")
    invite.add_argument("--qr", action="store_true",
                        help="show the QR code of the join page's URL (the default; --no-qr turns it off)")
    invite.add_argument(
        "--expires",
        type=duration,
        metavar="DURATION",
        help="make an invite that members refuse after this long (e.g. 90s, 30m, 1h, 7d)",
    )
    invite.set_defaults(handler=run_invite)

    join = sub.add_parser("join", help="make a running node join a mesh")
    join.add_argument("invite", help="the invite token (shoal1-...)")
    join.add_argument("--api", metavar="URL", help="node to tell (default: the configured address)")
    join.set_defaults(handler=run_join)

    leave = sub.add_parser("leave", help="make a running node leave its mesh and forget it (no rejoin)")
    leave.add_argument("--api", metavar="URL", help="node to tell (default: the configured address)")
    leave.set_defaults(handler=run_leave)

    rotate = sub.add_parser(
        "rotate",
        help="replace the mesh secret: members linked now get the new one, old invites stop working",
    )
    rotate.add_argument("--api", metavar="URL", help="node to tell (default: the configured address)")
    rotate.add_argument("--no-qr", action="store_true", help="print the new invite's token only")
    rotate.set_defaults(handler=run_rotate)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """`90`, `90s`, `30m`, `1h`, `7d` as whole seconds (1 s to 366 days)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 1h or 7d")
    seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not 1 <= seconds <= 366 * 86400:
        raise argparse.ArgumentTypeError("a duration from 1 s to 366 days")
    return seconds


def _show(token: str, qr: bool, url: str | None = None) -> None:
    print(token)
    if qr:
        if url:
            print(f"join page: {url}")
        print()
        print(render_qr(url or token), end="")
        if url:
            print("Scan on a phone to join in its browser, or paste the token (or the URL) into "
                  "`shoal node --join` / `shoal mesh join`.")
        else:
            print("Scan on a phone, or paste the token into `shoal node --join` / `shoal mesh join`.")


def run_create(args: argparse.Namespace) -> int:
    try:
        invite = Invite.create(args.name, tuple(args.bootstrap)).with_servers(tuple(args.server))
    except InviteError as exc:
        raise CommandError(str(exc)) from None
    if args.data_dir is not None:
        save_invite(args.data_dir, invite)
    _show(invite.to_token(), not args.no_qr)
    return 0


def run_relay(args: argparse.Namespace) -> int:
    """coturn's configuration lines for a relay whose TURN credentials members derive from the mesh secret
    (`mesh.p2p.relays`)."""
    from shoal.mesh.p2p.relays import turn_secret

    try:
        invite = Invite.from_token(args.invite)
    except InviteError as exc:
        raise CommandError(str(exc)) from None
    if invite.expires is not None:
        raise CommandError("an expiring invite holds no mesh secret; use the mesh's own invite")
    print(f"# /etc/turnserver.conf for mesh {invite.mesh_id} ({invite.name}); keep it private")
    print("listening-port=3478")
    print(f"realm={args.realm}")
    print("use-auth-secret")
    print(f"static-auth-secret={turn_secret(invite.secret)}")
    print("no-cli")
    return 0


def run_invite(args: argparse.Namespace) -> int:
    path = "/v1/mesh/invite" if args.expires is None else f"/v1/mesh/invite?expires_in={args.expires}"
    body = call(args.api, path)
    _show(body["invite"], not args.no_qr, body.get("url"))
    if body.get("expires"):
        print(f"expires {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(body['expires']))}")
    return 0


def run_join(args: argparse.Namespace) -> int:
    try:
        Invite.from_token(args.invite)
    except InviteError as exc:
        raise CommandError(str(exc)) from None
    body = call(args.api, "/v1/mesh/join", {"invite": args.invite})
    print(f"joined mesh {body['mesh']}; contacting {', '.join(body['bootstrap']) or 'no bootstrap address'}")
    return 0


def run_leave(args: argparse.Namespace) -> int:
    body = call(args.api, "/v1/mesh/leave", {})
    if body.get("left"):
        print(f"left mesh {body['left']}; closed {body['closed']} link(s); the saved invite is forgotten")
    else:
        print("this node was in no mesh")
    if body.get("configured"):
        print("note: the node's config names a mesh secret or invite ([mesh] invite/secret), so it joins "
              "again on restart; remove it from the config to stay out")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    body = call(args.api, "/v1/mesh/rotate", {}, timeout=30.0)
    print(f"mesh {body['previous']} is now {body['mesh']}; re-keyed {len(body['rekeyed'])} linked member(s)")
    for failed in body.get("failed") or []:
        print(f"  not re-keyed: {failed['id'][:16]}: {failed['reason']}")
    print("members not linked now, and every old invite, are refused from now on; share this new invite:")
    if body.get("invite"):
        _show(body["invite"], not args.no_qr)
    return 0
