"""`shoal pull NAME` through the node that runs on the same data dir: its mesh peers serve blocks first and
names resolve through the mesh's catalogs (a standalone pull sees neither). Progress comes back as the
node's NDJSON pull stream (`POST /api/pull`), drawn with the same progress line as a standalone pull.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from shoal.mesh.commands.cli import CommandError
from shoal.mesh.commands.node_client import node_url
from shoal.mesh.ipfs.cli_support import ProgressLine
from shoal.mesh.ipfs.pull_progress import Progress

PROBE_TIMEOUT_S = 2.0
"""How long `running_node` waits for a node to say which data dir it runs on."""
MAX_LINE = 64 * 1024
"""Longest NDJSON line accepted from the node."""


def running_node(api: str | None, data_dir: Path) -> tuple[str, dict[str, str]] | None:
    """The base URL and auth headers of a node that answers at `api` (default: the configured address) and
    runs on `data_dir`; None when none does (the pull then runs standalone)."""
    try:
        base, headers = node_url(api)
    except CommandError:
        return None
    request = urllib.request.Request(base + "/v1/node", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            described = json.loads(response.read(MAX_LINE))
    except (OSError, ValueError):
        return None
    node_dir = described.get("data_dir") if isinstance(described, dict) else None
    if not isinstance(node_dir, str) or Path(node_dir).resolve() != data_dir.resolve():
        return None
    return base, headers


def pull_via_node(base: str, headers: dict[str, str], model: str, quiet: bool) -> str:
    """Pull `model` through the node; returns the assembled file's path. `CommandError` on any failure."""
    body = json.dumps({"model": model, "stream": True}).encode()
    request = urllib.request.Request(base + "/api/pull", data=body, method="POST",
                                     headers={**headers, "Content-Type": "application/json"})
    bar = None if quiet else ProgressLine(model)
    if not quiet:
        print(f"pulling {model} via the node at {base} (its mesh peers first)", file=sys.stderr)
    cid = ""
    try:
        with urllib.request.urlopen(request, timeout=None) as response:
            cid = _follow(response, bar)
    except urllib.error.HTTPError as exc:
        raise CommandError(f"{base}/api/pull: HTTP {exc.code}: {_message(exc.read(MAX_LINE))}") from None
    except OSError as exc:
        raise CommandError(f"the node at {base} stopped answering during the pull ({exc})") from None
    finally:
        if bar is not None:
            bar.done()
    return _path_of(base, headers, model, cid)


def _follow(response: Any, bar: ProgressLine | None) -> str:
    """Read the node's NDJSON lines until success (the CID pulled) or an error line (CommandError)."""
    started, cid = time.monotonic(), ""
    for raw in response:
        if len(raw) > MAX_LINE:
            raise CommandError("the node sent an over-long progress line")
        try:
            line = json.loads(raw)
        except ValueError:
            raise CommandError(f"the node sent a line that is not JSON: {raw[:80]!r}") from None
        if not isinstance(line, dict):
            continue
        if "error" in line:
            raise CommandError(_message(raw))
        if line.get("status") == "success":
            return cid
        if isinstance(line.get("digest"), str):
            cid = line["digest"]
            done, total = _count(line.get("completed")), _count(line.get("total"))
            if bar is not None and total:
                rate = done / max(time.monotonic() - started, 1e-3)
                bar(Progress(cid, done, total, 0, rate, (total - done) / rate if rate else None))
    raise CommandError("the node ended the pull stream without success")


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _message(raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


def _path_of(base: str, headers: dict[str, str], model: str, cid: str) -> str:
    """Where the node keeps the pulled file (`GET /v1/ipfs/models`), by CID or name."""
    request = urllib.request.Request(base + "/v1/ipfs/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            listed = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise CommandError(f"pulled, but the node at {base} did not list its models ({exc})") from None
    for entry in listed.get("models", []) if isinstance(listed, dict) else []:
        if isinstance(entry, dict) and (entry.get("cid") in (cid, model) or model in entry.get("names", [])) \
                and entry.get("complete") and entry.get("path"):
            return str(entry["path"])
    raise CommandError(f"pulled, but the node at {base} does not list {model} as complete")
