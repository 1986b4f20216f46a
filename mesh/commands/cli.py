"""The `shoal` command. Each subcommand lives in its own module under `mesh/commands/`.

A command module exposes `register(subparsers: argparse._SubParsersAction) -> None`, which adds its parser and
sets `handler=<callable(args) -> int>` as a default. Handlers return the process exit code; user errors are
raised as `CommandError` and printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Order here is the order in `shoal --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "node",
    "chat",
    "publish",
    "pull",
    "compile",
    "models",
    "tui",
    "mesh",
    "peers",
)


class CommandError(Exception):
    """A problem the user can fix (bad argument, missing file, node down): printed without traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="shoal: an inference mesh for edge devices. Models come from IPFS, are compiled with "
        "TVM Relax for this device, and are served over an OpenAI-compatible API and shared over WebRTC.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"shoal.mesh.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args) or 0)
    except CommandError as exc:
        print(f"shoal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shoal {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the importable `mesh.cli`, not this `__main__` copy: commands raise `mesh.cli.CommandError`.
    from shoal.mesh.commands.cli import main as _main

    sys.exit(_main())
