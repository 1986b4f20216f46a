"""Small synchronous client for CLI commands that ask a running node's API (mesh commands)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

from shoal.mesh.commands.cli import CommandError
from shoal.mesh.node.config import ConfigError, load_config, parse_host_port


def data_dir(flag: Path | None) -> Path:
    """`--data-dir`, else the node's data dir as `shoal node` reads it (config file, `SHOAL_DATA_DIR`)."""
    if flag is not None:
        return flag
    try:
        return load_config().data_dir
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def node_url(api: str | None) -> tuple[str, dict[str, str]]:
    """Base URL and auth headers of the node to ask: `--api` or the configured address."""
    try:
        config = load_config()
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    headers = {"Authorization": f"Bearer {config.api.key}"} if config.api.key else {}
    if api and api.startswith(("http://", "https://")):
        return api.rstrip("/"), headers
    host, port = parse_host_port(api) if api else (config.api.host, config.api.port)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return (f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"), headers


def call(api: str | None, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    base, headers = node_url(api)
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers = {**headers, "Content-Type": "application/json"}
    request = urllib.request.Request(
        base + path, data=data, headers=headers, method="POST" if data else "GET"
    )
    return _send(base, path, request, timeout)


def upload(api: str | None, path: str, file: BinaryIO, size: int, timeout: float = 3600.0) -> Any:
    """POST `file` (`size` bytes, streamed) as `application/octet-stream` to `path`; the JSON answer."""
    base, headers = node_url(api)
    headers = {**headers, "Content-Type": "application/octet-stream", "Content-Length": str(size)}
    request = urllib.request.Request(base + path, data=file, headers=headers, method="POST")
    return _send(base, path.split("?", 1)[0], request, timeout)


def _send(base: str, path: str, request: urllib.request.Request, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise CommandError(f"{base}{path}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(f"no node answers at {base} ({exc}); start one with `shoal node`") from None
