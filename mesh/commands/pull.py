"""`shoal pull CID|NAME`: fetch a model from IPFS into the local store, verified and resumable.

When a node runs on the same data dir (it answers at `--api`, default the configured address), the pull goes
through it: its mesh peers serve blocks first and a name resolves through the mesh's catalogs. Otherwise (or
with `--standalone`, or `--gateway`/`--layers`) this process pulls from its own sources.

Exit codes: 0 done; 2 failed (no source has a block, bad input, or no block arrived for `--stall-timeout`
seconds); 130 interrupted (Ctrl-C / SIGINT, which the pull honours at once: nothing is left running).
"""

from __future__ import annotations

import argparse
import asyncio

from shoal.mesh.commands.cli import CommandError
from shoal.mesh.commands.node_client import data_dir as node_data_dir
from shoal.mesh.commands.pull_via_node import pull_via_node, running_node
from shoal.mesh.ipfs.cli_support import (
    ProgressLine,
    add_data_dir_option,
    add_source_options,
    config_from_args,
    human_bytes,
)
from shoal.mesh.ipfs.errors import BlockNotFoundError, IpfsError
from shoal.mesh.ipfs.service import IpfsService
from shoal.models.errors import ModelError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pull", help="fetch a model (by CID or catalog name) from IPFS",
                                   description=__doc__)
    parser.add_argument("model", help="a CID (Qm…, bafy…) or a catalog name (see `shoal models`)")
    parser.add_argument("--layers", metavar="A:B", default=None,
                        help="fetch only the GGUF header and the tensors of layers [A, B)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    parser.add_argument("--stall-timeout", type=float, default=120.0, metavar="S",
                        help="give up (exit 2) when no block arrives for S seconds (default: %(default)s)")
    parser.add_argument("--standalone", action="store_true",
                        help="pull in this process even when a node runs on the data dir (no mesh peers)")
    parser.add_argument("--api", metavar="HOST:PORT", default=None,
                        help="the node to pull through (default: the configured address)")
    add_data_dir_option(parser)
    add_source_options(parser)
    parser.set_defaults(handler=run)


WHERE_TO_LOOK = (
    "  sources: this node's block store, a local IPFS node's RPC API (--rpc, default http://127.0.0.1:5001), "
    "gateways (--gateway URL: an IPFS gateway or a shoal node's API); a running `shoal node` in a mesh also "
    "asks its peers (`shoal node --join INVITE`)"
)
"""Said when no source had a block: where pull looked and which flag or setting adds a source."""


async def _pull(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    async with IpfsService(config, node_data_dir(args.data_dir)) as service:
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
        except BlockNotFoundError as exc:
            raise CommandError(f"{exc}\n{WHERE_TO_LOOK}") from None
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
    if not (args.standalone or args.layers or args.gateway):
        node = running_node(args.api, node_data_dir(args.data_dir))
        if node is not None:
            print(pull_via_node(*node, args.model, args.quiet))
            return 0
    return asyncio.run(_pull(args))
