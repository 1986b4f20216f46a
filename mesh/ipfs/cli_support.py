"""Shared pieces of the `publish`, `pull` and `models` commands: data dir, source options, progress."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shoal.mesh.ipfs.config import IpfsConfig
from shoal.mesh.ipfs.fetcher import Progress


def add_data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="node data directory (default: the node's: config file, SHOAL_DATA_DIR, or the "
                             "platform's data dir)")


def add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpc", metavar="URL", default="http://127.0.0.1:5001",
                        help="a local IPFS node's RPC API (default: %(default)s)")
    parser.add_argument("--no-rpc", action="store_true", help="do not ask a local IPFS node")
    parser.add_argument("--gateway", metavar="URL", action="append", default=[],
                        help="a trustless gateway or shoal node, e.g. http://192.168.1.7:8600 (repeatable)")
    parser.add_argument("--timeout", type=float, default=15.0, metavar="S",
                        help="per-source timeout for one block (default: %(default)s)")
    parser.add_argument("--parallel", type=int, default=8, metavar="N",
                        help="blocks fetched at once (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=4, metavar="N",
                        help="rounds over all sources before a block is missing (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> IpfsConfig:
    return IpfsConfig(
        rpc_url=None if getattr(args, "no_rpc", False) else getattr(args, "rpc", None),
        gateways=tuple(getattr(args, "gateway", ())),
        block_timeout_s=getattr(args, "timeout", 15.0),
        parallelism=getattr(args, "parallel", 8),
        retries=getattr(args, "retries", 4),
        stall_timeout_s=getattr(args, "stall_timeout", None) or IpfsConfig.stall_timeout_s,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressLine:
    """A one-line progress bar on stderr (only redrawn when stderr is a terminal, or every few seconds)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if not self.tty and now - self._last < 2.0 and p.bytes_done < p.bytes_total:
            return
        self._last = now
        pct = 100.0 * p.bytes_done / p.bytes_total if p.bytes_total else 100.0
        eta = f"ETA {p.eta_s:.0f}s" if p.eta_s is not None else "ETA ?"
        line = (f"{self.label}  {human_bytes(p.bytes_done)} / {human_bytes(p.bytes_total)}  {pct:5.1f}%  "
                f"{human_bytes(p.rate_bps)}/s  {eta}  blocks {p.blocks_done}")
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
