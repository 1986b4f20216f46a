"""`shoal node`: run a node in the foreground (OpenAI-compatible API on 127.0.0.1:8740 by default)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from shoal.mesh.commands.cli import CommandError
from shoal.mesh.ipfs.errors import IpfsError
from shoal.mesh.node.config import BACKENDS, ConfigError, load_config, parse_host_port
from shoal.mesh.p2p.errors import MeshError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by commands that need the node's config (`node`, `chat`)."""
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="config TOML (default: the user config dir)"
    )
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="blocks, compile cache and identity")
    parser.add_argument("--backend", choices=BACKENDS, help="run models compiled with TVM (default) or NumPy")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    api_flag = getattr(args, "api", None)
    if api_flag and not api_flag.startswith(("http://", "https://")):
        host, port = parse_host_port(api_flag)
        overrides["api"] = {"host": host, "port": port}
    if getattr(args, "api_key", None):
        overrides.setdefault("api", {})["key"] = args.api_key
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = str(args.data_dir)
    if getattr(args, "backend", None):
        overrides["models"] = {"backend": args.backend}
    if getattr(args, "join", None):
        overrides["mesh"] = {"invite": args.join}
    return overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "node",
        help="run a node: OpenAI-compatible API, event stream, mesh",
        description="Run a shoal node in the foreground. Apps call it like OpenAI: "
        "POST http://127.0.0.1:8740/v1/chat/completions. Ctrl-C or SIGTERM stops it gracefully. "
        "Settings come from the config TOML, then SHOAL_<SECTION>_<KEY> environment variables, then flags.",
    )
    parser.add_argument("--api", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:8740)")
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (mandatory when listening beyond loopback)",
    )
    parser.add_argument("--join", metavar="INVITE", help="join the mesh of this invite (`shoal mesh create`)")
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from shoal.mesh.node.node import build_node, serve_until_signalled

    try:
        config = load_config(args.config, overrides=config_overrides(args))
        config.api.check_exposure()
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    if args.join:
        remember_invite(config.data_dir, args.join)
    for name in ("shoal.mesh", "shoal.models"):  # the node logs its progress (compile, requests) by default
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        node = build_node(config)
        asyncio.run(serve_until_signalled(node))
    except (OSError, MeshError, IpfsError) as exc:  # port taken, unreadable identity or store, ...
        raise CommandError(str(exc)) from None
    return 0


def remember_invite(data_dir: Path, token: str) -> None:
    """Keep a `--join` invite, as a runtime join does, so the node rejoins after a restart without the flag —
    unless the saved invite is already of that mesh (it may hold the secret an expiring invite led to) or
    that mesh was rotated away from (the saved invite holds the new secret)."""
    from shoal.mesh.p2p.invite import Invite, load_saved_invite, save_invite
    from shoal.mesh.p2p.rekey import load_superseded

    try:
        invite = Invite.from_token(token)
        try:
            saved = load_saved_invite(data_dir)
        except MeshError:  # damaged: replace it
            saved = None
        rotated_away = invite.mesh_id in load_superseded(data_dir)
        if saved is None or (saved.mesh_id != invite.mesh_id and not rotated_away):
            save_invite(data_dir, invite)
    except (OSError, MeshError) as exc:
        raise CommandError(f"cannot keep the invite in {data_dir}: {exc}") from None
