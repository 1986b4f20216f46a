"""Async HTTP + SSE client of a shoal node's API: the only way the TUI talks to a node.

Every call has a timeout; failures become one of three errors the screens know how to show:
`NodeUnreachable` (nothing answers), `NotAvailable` (this node has no such endpoint: 404/405/501 on a route)
and `ApiError` (the node answered with an OpenAI-style error body).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

DEFAULT_API = "http://127.0.0.1:8740"


class NodeError(Exception):
    """Base of the errors the TUI shows to the user (never as a traceback)."""


class NodeUnreachable(NodeError):
    """No node answers at the API address (refused, reset, timed out)."""


class NotAvailable(NodeError):
    """The node answers but has no such endpoint (an older node, or a feature it was built without)."""


class ApiError(NodeError):
    """The node refused a request; carries the OpenAI-style error fields."""

    def __init__(self, status: int, message: str, type_: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code


@dataclass(frozen=True)
class ClientConfig:
    """Timeouts of the node client, in seconds."""

    base_url: str = DEFAULT_API
    connect_timeout: float = 2.0
    """Time to open a TCP connection to the node."""
    request_timeout: float = 10.0
    """Whole-request limit for ordinary JSON calls."""
    health_timeout: float = 3.0
    """Limit for `GET /health`, which decides whether the node is up."""
    slow_timeout: float = 1800.0
    """Limit for calls that do heavy work before answering (compile, load, publish)."""
    stream_idle_timeout: float = 60.0
    """Longest silence tolerated inside a chat stream."""
    events_idle_timeout: float = 45.0
    """Longest silence on the event stream (the node sends a keep-alive every 15 s) before reconnecting."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"API URL must start with http:// or https://, got {self.base_url!r}")


@dataclass
class ChatDelta:
    """One piece of a streamed chat answer: new text, and the route once the node reports it."""

    text: str = ""
    route: dict[str, Any] | None = None
    finish_reason: str | None = None
    progress: str | None = None
    """Why the answer waits, as the node reports it (a peer loading layers, a queue, a recovery)."""
    extra: dict[str, Any] = field(default_factory=dict)


def _error_from(status: int, body: bytes, path: str) -> NodeError:
    try:
        payload = orjson.loads(body)
        err = payload.get("error", {}) if isinstance(payload, dict) else {}
    except orjson.JSONDecodeError:
        err = {}
    if not isinstance(err, dict):
        err = {"message": str(err)}
    message = str(err.get("message") or body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}")
    code = err.get("code")
    # A missing route: 405/501, or a 404 that names no particular thing (aiohttp's plain 404, `unknown_url`).
    # A 404 with its own code (`model_not_found`, `no_mesh`) is a real answer and keeps its message.
    if status in (405, 501) or (status == 404 and code in (None, "", "unknown_url")):
        return NotAvailable(f"{path}: not available on this node")
    return ApiError(status, message, str(err.get("type", "")), code)


PROGRESS_PREFIX = "shoal progress "
"""A node's progress comment (`: shoal progress {json}`) while a streamed answer waits."""


@dataclass
class SseComment:
    """A comment line of an SSE stream (what follows the colon, one leading space removed)."""

    text: str


async def iter_sse(content: Any, comments: bool = False) -> AsyncIterator[Any]:
    """Yield the data of each server-sent event (multi-line data joined with newlines); with `comments`, also
    each comment line as an `SseComment`."""
    data: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            if comments:
                yield SseComment(line[2:] if line.startswith(": ") else line[1:])
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def progress_report(comment: str) -> dict[str, Any] | None:
    """The report a `shoal progress` comment carries, or None for any other comment."""
    if not comment.startswith(PROGRESS_PREFIX):
        return None
    try:
        report = orjson.loads(comment[len(PROGRESS_PREFIX):])
    except orjson.JSONDecodeError:
        return None
    return report if isinstance(report, dict) else None


class NodeClient:
    """One node's API. Create inside a running loop; `close()` is safe to call twice."""

    def __init__(self, config: ClientConfig | str = DEFAULT_API) -> None:
        self.config = ClientConfig(base_url=config) if isinstance(config, str) else config
        self.base_url = self.config.base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(json_serialize=lambda o: orjson.dumps(o).decode())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, total: float | None, sock_read: float | None = None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=total, sock_connect=self.config.connect_timeout, sock_read=sock_read
        )

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        slow: bool = False,
        limit: float | None = None,
        **params: Any,
    ) -> Any:
        """One JSON call. `slow` calls (compile, load, publish) may take minutes: they get `slow_timeout`."""
        url = self.base_url + path
        limit = limit or (self.config.slow_timeout if slow else self.config.request_timeout)
        try:
            async with self.session.request(
                method, url, json=body, params=params or None, timeout=self._timeout(limit)
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise _error_from(resp.status, raw, path)
                return orjson.loads(raw) if raw else {}
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise NodeUnreachable(f"no node answers at {self.base_url} ({type(exc).__name__})") from exc
        except orjson.JSONDecodeError as exc:
            raise ApiError(200, f"{path}: node sent invalid JSON") from exc

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, **params)

    async def post(self, path: str, body: Any = None, *, slow: bool = False) -> Any:
        return await self.request("POST", path, body if body is not None else {}, slow=slow)

    async def put(self, path: str, body: Any) -> Any:
        return await self.request("PUT", path, body)

    # -- typed helpers -------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/health", limit=self.config.health_timeout)

    async def node_info(self) -> dict[str, Any]:
        return await self.get("/v1/node")

    async def models(self) -> list[dict[str, Any]]:
        return list((await self.get("/v1/models")).get("data", []))

    async def catalog(self) -> list[dict[str, Any]]:
        """The node's IPFS model catalog: `[{"cid", "names", "size", "pinned", "complete"}]`."""
        return list((await self.get("/v1/ipfs/models")).get("models", []))

    async def peers(self) -> dict[str, Any]:
        """`{"peers": [...]}`, plus `"self"` (id, name, mesh) on nodes that report it."""
        return dict(await self.get("/v1/mesh/peers"))

    async def route(self) -> dict[str, Any]:
        """`GET /v1/mesh/route`: the forced route, this node's advert fields and its `warming` state."""
        return dict(await self.get("/v1/mesh/route"))

    async def usage(self) -> dict[str, Any]:
        """`GET /v1/mesh/usage`: work given to and received from each peer, from the signed receipts."""
        return dict(await self.get("/v1/mesh/usage"))

    async def topology(self) -> dict[str, Any]:
        return await self.get("/v1/mesh/topology")

    async def invite(self) -> str:
        return str((await self.get("/v1/mesh/invite")).get("invite", ""))

    async def invite_view(self) -> dict[str, Any]:
        """`GET /v1/mesh/invite?qr=1`: the invite, `url` (the join page with the invite in its fragment, or
        None) and `qr` (a QR code of the URL, else of the invite, in Unicode half blocks)."""
        return dict(await self.get("/v1/mesh/invite?qr=1"))

    async def join(self, invite: str) -> dict[str, Any]:
        return await self.post("/v1/mesh/join", {"invite": invite})

    async def requests(self) -> list[dict[str, Any]]:
        return list((await self.get("/v1/mesh/requests")).get("requests", []))

    async def logs(self, level: str = "INFO", limit: int = 200) -> list[dict[str, Any]]:
        return list((await self.get("/v1/logs", level=level, limit=limit)).get("lines", []))

    async def policy(self) -> dict[str, Any]:
        return await self.get("/v1/policy")

    async def set_policy(self, **changes: Any) -> dict[str, Any]:
        return await self.put("/v1/policy", changes)

    async def pull(self, model: str) -> dict[str, Any]:
        return await self.post("/v1/models/pull", {"model": model})

    async def publish(self, path: str) -> dict[str, Any]:
        """Upload a file from this machine (the node stores and pins it; it reads no paths for clients)."""
        file = await asyncio.to_thread(lambda: Path(path).expanduser())
        if not await asyncio.to_thread(file.is_file):
            raise ApiError(400, f"{path} is not a file", "invalid_request_error", "file_not_found")
        filename = re.sub(r"[^A-Za-z0-9._-]", "_", file.name).lstrip("._-")[:128] or "upload.gguf"
        handle = await asyncio.to_thread(open, file, "rb")
        try:  # aiohttp streams a file body, reading it in a worker thread
            async with self.session.post(
                self.base_url + "/v1/models/publish",
                data=handle,
                params={"filename": filename},
                headers={"Content-Type": "application/octet-stream"},
                timeout=self._timeout(self.config.slow_timeout),
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise _error_from(resp.status, raw, "/v1/models/publish")
                return orjson.loads(raw)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise NodeUnreachable(f"no node answers at {self.base_url} ({type(exc).__name__})") from exc
        finally:
            await asyncio.to_thread(handle.close)

    async def model_action(
        self, model: str, action: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if action not in ("compile", "load", "unload"):
            raise ValueError(f"unknown model action {action!r}")
        return await self.post(f"/v1/models/{model}/{action}", body or {}, slow=True)

    # -- streams -------------------------------------------------------------------------------------

    async def _stream(
        self,
        method: str,
        path: str,
        body: Any,
        sock_read: float | None,
        headers: dict[str, str] | None = None,
        comments: bool = False,
    ) -> AsyncIterator[Any]:
        """The data of each server-sent event (and, with `comments`, each `SseComment`); the response
        headers are copied into `headers` first."""
        try:
            async with self.session.request(
                method, self.base_url + path, json=body, timeout=self._timeout(None, sock_read)
            ) as resp:
                if resp.status >= 400:
                    raise _error_from(resp.status, await resp.read(), path)
                if headers is not None:
                    headers.update({k.lower(): v for k, v in resp.headers.items()})
                async for data in iter_sse(resp.content, comments):
                    yield data
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise NodeUnreachable(f"stream {path} from {self.base_url} broke ({type(exc).__name__})") from exc

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The node's event stream (`GET /v1/events`), until the connection ends."""
        async for data in self._stream("GET", "/v1/events", None, self.config.events_idle_timeout):
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict) and "kind" in event:
                yield event

    async def chat(
        self, model: str, prompt: str, max_tokens: int = 128, temperature: float = 0.0
    ) -> AsyncIterator[ChatDelta]:
        """Stream a one-message chat completion; yields text deltas, then one with the route if reported."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
        }
        headers: dict[str, str] = {}
        announced = False
        stream = self._stream("POST", "/v1/chat/completions", body, self.config.stream_idle_timeout, headers,
                              comments=True)
        async for data in stream:
            if isinstance(data, SseComment):
                report = progress_report(data.text)
                if report is not None:
                    yield ChatDelta(progress=str(report.get("message", "")))
                continue
            if not announced and headers.get("x-shoal-route"):  # the route, before the first token
                announced = True
                yield ChatDelta(route={"kind": headers["x-shoal-route"]})
            if data.strip() == "[DONE]":
                return
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if "error" in chunk:
                err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                raise ApiError(500, str(err.get("message", "generation failed")), str(err.get("type", "")))
            delta = ChatDelta(route=chunk.get("shoal_route"))
            for choice in chunk.get("choices") or []:
                delta.text += (choice.get("delta") or {}).get("content") or ""
                delta.finish_reason = choice.get("finish_reason") or delta.finish_reason
            if delta.text or delta.route or delta.finish_reason:
                yield delta
