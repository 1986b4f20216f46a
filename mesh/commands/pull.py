"""`shoal pull CID|NAME`: fetch a model from IPFS into the local store, verified and resumable."""

from __future__ import annotations

import argparse
import asyncio

from shoal.mesh.commands.cli import CommandError
from shoal.mesh.ipfs.cli_support import (
    ProgressLine,
    add_data_dir_option,
    add_source_options,
    config_from_args,
    default_data_dir,
    human_bytes,
)
from shoal.mesh.ipfs.errors import IpfsError
from shoal.mesh.ipfs.service import IpfsService
from shoal.models.errors import ModelError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pull", help="fetch a model (by CID or catalog name) from IPFS",
                                   description=__doc__)
    parser.add_argument("model", help="a CID (Qm…, bafy…) or a catalog name (see `shoal models`)")
    parser.add_argument("--layers", metavar="A:B", default=None,
                        help="fetch only the GGUF header and the tensors of layers [A, B)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    add_data_dir_option(parser)
    add_source_options(parser)
    parser.set_defaults(handler=run)


async def _pull(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    data_dir = args.data_dir or default_data_dir()
    async with IpfsService(config, data_dir) as service:
        try:
            if args.layers:
                from shoal.models.span import LayerSpan

                text_start, _, text_stop = args.layers.partition(":")
                try:
                    span = LayerSpan(int(text_start), int(text_stop))
                except ValueError:
                    raise CommandError(f"--layers must be A:B with A < B, not {args.layers!r}") from None
                path = await service.pull_span(args.model, span)
                print(path)
                return 0
            bar = None if args.quiet else ProgressLine(args.model)
            result = await service.pull_detailed(args.model, progress=bar)
            if bar is not None:
                bar.done()
        except (IpfsError, ModelError, ValueError) as exc:
            raise CommandError(str(exc)) from None
    stats = result.stats
    print(result.path)
    if not args.quiet:
        import sys

        print(f"{result.cid}  {human_bytes(result.size)}  fetched {stats.blocks_fetched} blocks, "
              f"{stats.blocks_local} already local, {stats.bad_blocks} rejected", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_pull(args))
