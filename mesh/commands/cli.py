"""The `shoal` command. Each subcommand lives in its own module under `mesh/commands/`.

A command module exposes `register(subparsers: argparse._SubParsersAction) -> None`, which adds its parser and
sets `handler=<callable(args) -> int>` as a default. Handlers return the process exit code; user errors are
raised as `CommandError` and printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from shoal.mesh.version import shoal_version
from shoal.models.errors import ModelError

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
    "usage",
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
    parser.add_argument("--version", action="version", version=f"shoal {shoal_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
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
        code = int(handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at interpreter exit
        return code
    except CommandError as exc:
        print(f"shoal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shoal {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`shoal peers --json | head`): nothing more to say, and nothing to flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if args.debug:
            raise
        print(f"shoal {args.command}: error: {describe_error(exc)}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 1


def describe_error(exc: BaseException) -> str:
    """One line a person can act on: the domain errors' messages say what to do; others name their type."""
    if isinstance(exc, (ModelError, ValueError, OSError, LookupError)) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy: commands raise its `CommandError`.
    from shoal.mesh.commands.cli import main as _main

    sys.exit(_main())
