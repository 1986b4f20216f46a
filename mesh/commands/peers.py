"""`shoal peers`: the peers a running node is linked to, with round-trip times, what kind of link (host,
server-reflexive, peer-reflexive or relayed, and over which protocol) and what they advertise: free memory,
measured speed (TOK/S: the fastest decode tok/s over their models) and load (QUEUE: requests they are busy
with), which the planner places requests by."""

from __future__ import annotations

import argparse
import json

from shoal.mesh.commands.node_client import call


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("peers", help="list a running node's mesh peers", description=__doc__)
    parser.add_argument("--api", metavar="URL", help="node to ask (default: the configured address)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run)


def _memory(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value / 2**30:.1f}G"


def _link(path: object) -> str:
    """`host/udp`, `server-reflexive/udp`, `relayed/tcp`, ...: what the link's selected ICE pair is."""
    if not isinstance(path, dict):
        return "-"
    return f"{path.get('type', '?')}/{path.get('protocol', '?')}"


def _speed(advert: dict) -> str:
    """The fastest measured decode tok/s the peer advertises over its models (its speed probe, then its
    finished requests), or `-` before any measurement."""
    speed = advert.get("speed") if isinstance(advert.get("speed"), dict) else {}
    rates = [v.get("decode_tok_s") for v in speed.values() if isinstance(v, dict)]
    rates = [r for r in rates if isinstance(r, int | float) and not isinstance(r, bool) and r > 0]
    return f"{max(rates):.1f}" if rates else "-"


def run(args: argparse.Namespace) -> int:
    view = call(args.api, "/v1/mesh/peers")
    if args.json:
        print(json.dumps(view, indent=1))
        return 0
    me = view["self"]
    mesh = f"mesh {me['mesh']}" if me.get("mesh") else "not in a mesh (shoal mesh join INVITE)"
    print(f"this node: {me['name']} {me['id']} {mesh} api {me['api'] or '-'}")
    standing = view.get("mesh") if isinstance(view.get("mesh"), dict) else {}
    if standing.get("status") == "refused":
        print(
            f"refused by {standing.get('by')} ({standing.get('code')}): {standing.get('reason')}; "
            f"next try in {standing.get('retry_in_s')} s (refusals: {standing.get('refusals')})"
        )
    peers = view["peers"]
    if not peers:
        print("no peers linked")
    else:
        header = (f"{'NAME':16} {'ID':20} {'STATE':10} {'RTT ms':>8} {'LINK':22} {'FREE':>6} {'TOK/S':>6} "
                  f"{'QUEUE':>5}")
        print(f"{header}  MODELS")
        for peer in peers:
            advert = peer.get("advert") or {}
            rtt = f"{peer['rtt_ms']:.2f}" if isinstance(peer.get("rtt_ms"), int | float) else "-"
            models = ", ".join(str(m) for m in advert.get("models", []))[:40]
            models = models or ("(browser tab)" if peer.get("kind") == "browser" else "-")
            print(
                f"{peer['name'][:16]:16} {peer['id'][:20]:20} {peer['state']:10} {rtt:>8} "
                f"{_link(peer.get('path')):22} "
                f"{_memory(advert.get('free_memory')):>6} {_speed(advert):>6} "
                f"{advert.get('queue_depth', '-')!s:>5}  {models}"
            )
    ice = view.get("ice") if isinstance(view.get("ice"), dict) else {}
    for check in ice.get("turn") or []:
        if isinstance(check, dict) and check.get("ok") is False:
            print(f"TURN {check.get('url')} unusable ({check.get('code')}): {check.get('reason')}")
    if view.get("banned"):
        print(f"banned: {', '.join(pid[:20] for pid in view['banned'])}")
    return 0
