"""`shoal publish FILE`: import a model file into the local block store (the same CID `ipfs add` gives),
pin it, optionally name it and push it to the local IPFS node. With `--api`, upload it to a running node
instead (the node stores and pins it; it never reads a path named by a client)."""

from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path
from urllib.parse import urlencode

from shoal.mesh.commands.cli import CommandError
from shoal.mesh.commands.node_client import data_dir, upload
from shoal.mesh.ipfs.catalog import check_name
from shoal.mesh.ipfs.cli_support import add_data_dir_option, config_from_args
from shoal.mesh.ipfs.errors import IpfsError
from shoal.mesh.ipfs.service import IpfsService


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("publish", help="add a model file to the local store and print its CID",
                                   description=__doc__)
    parser.add_argument("file", type=Path, help="the GGUF file")
    parser.add_argument("--name", help="catalog name to give it (e.g. my-model-q4)")
    parser.add_argument("--cid-version", type=int, choices=(0, 1), default=1,
                        help="1: CIDv1 with raw leaves (default); 0: CIDv0 (Kubo's `ipfs add` default)")
    parser.add_argument("--to-ipfs", action="store_true",
                        help="also push the blocks to the local IPFS node (RPC dag/import)")
    parser.add_argument("--rpc", metavar="URL", default="http://127.0.0.1:5001",
                        help="the IPFS node's RPC API for --to-ipfs (default: %(default)s)")
    parser.add_argument("--api", metavar="HOST:PORT", nargs="?", const="", default=None,
                        help="upload the file to a running node (default: the configured [api] address) "
                             "instead of writing the data dir")
    add_data_dir_option(parser)
    parser.set_defaults(handler=run)


def _upload(args: argparse.Namespace) -> int:
    if args.to_ipfs:
        raise CommandError("--to-ipfs works on the local data dir; leave out --api to use it")
    filename = re.sub(r"[^A-Za-z0-9._-]", "_", args.file.name).lstrip("._-")[:128] or "upload.gguf"
    query = {"filename": filename, "cid_version": str(args.cid_version)}
    if args.name:
        query["name"] = args.name
    try:
        with open(args.file, "rb") as handle:
            size = args.file.stat().st_size
            body = upload(args.api or None, f"/v1/models/publish?{urlencode(query)}", handle, size)
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    print(body["cid"])
    return 0


async def _publish(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise CommandError(f"{args.file} is not a file")
    try:
        if args.name:
            check_name(args.name)
        config = config_from_args(args)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    async with IpfsService(config, data_dir(args.data_dir)) as service:
        try:
            cid = await service.publish(args.file, args.name, cid_version=args.cid_version,
                                        to_ipfs=args.to_ipfs)
        except IpfsError as exc:
            raise CommandError(str(exc)) from None
    print(cid)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.api is not None:
        if not args.file.is_file():
            raise CommandError(f"{args.file} is not a file")
        if args.name:
            try:
                check_name(args.name)
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        return _upload(args)
    return asyncio.run(_publish(args))
