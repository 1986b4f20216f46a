"""`shoal tui`: the terminal control room for a node and its mesh (a client of the node's HTTP API)."""

from __future__ import annotations

import argparse
import os

from shoal.mesh.commands.cli import CommandError

DEFAULT_API = "http://127.0.0.1:8740"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tui",
        help="terminal control room: mesh, models, chat, requests, policy, logs",
        description="Watch and steer a shoal node and its mesh from the terminal. "
        "Connects to the node at --api; "
        "when none answers there (and it is on this machine) it starts one for the session and says so.",
    )
    parser.add_argument(
        "--api",
        default=os.environ.get("SHOAL_TUI_API", DEFAULT_API),
        metavar="URL",
        help=f"node API URL (default {DEFAULT_API}, or $SHOAL_TUI_API)",
    )
    parser.add_argument("--no-start", action="store_true", help="never start a node; wait for one to answer")
    parser.add_argument("--data-dir", metavar="DIR", help="data dir of a node the TUI starts")
    parser.add_argument("--backend", choices=("tvm", "numpy"), help="backend of a node the TUI starts")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from shoal.tui.app import ShoalApp
    from shoal.tui.launcher import is_loopback_url, probe, start_node

    url = args.api.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CommandError(f"--api must be a URL like {DEFAULT_API}, got {args.api!r}")
    node = None
    notice = ""
    if not args.no_start and not probe(url) and is_loopback_url(url):
        extra = []
        if args.data_dir:
            extra += ["--data-dir", args.data_dir]
        if args.backend:
            extra += ["--backend", args.backend]
        node = start_node(url, extra)
        notice = f"no node answered, so the TUI started one (pid {node.pid}, log {node.log_path})"
    try:
        ShoalApp(url, notice, started_node=node).run()
    finally:
        if node is not None:
            node.stop()
    return 0
