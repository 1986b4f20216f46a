"""Who may drive the API, checked before the API key and any handler (`guard_middleware`):

- `Host` must be one of the node's own names: a loopback name or address, the address the client connected
  to, `[api] host`, `[mesh] advertise`, or `[api] allowed_hosts` (DNS rebinding: a page whose name resolves
  to 127.0.0.1 still sends its own name) -> else 403 `host_not_allowed`.
- A browser request from another origin (`Origin` not this node's own and not in `[api] allowed_origins`, or
  `Sec-Fetch-Site: cross-site|same-site` without `Origin`) -> 403 `origin_not_allowed`. Navigations (`GET`
  with `Sec-Fetch-Mode: navigate`) pass: their answer goes to the user, not to the page.
- A body must be `application/json` (`application/octet-stream` too on upload routes): a page can send
  `text/plain` without a CORS preflight, never JSON -> else 415 `unsupported_media_type`.
- Without an API key, only loopback clients may change state (non-GET methods) -> else 403 `forbidden`.
- A body that stops arriving for `[api] read_timeout_s` -> 408 `request_timeout`, connection closed.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from aiohttp import web
from shoal.mesh.api.errors import ApiError
from shoal.mesh.api.keys import NODE

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SIGNED_PATHS = frozenset({"/v1/mesh/signal"})
"""Paths any `Host` may reach: mesh signalling, whose offers carry their own signed membership proof, and
which a joiner may dial under a name the node does not know (an invite's bootstrap `laptop.local:8740`).
Browsers are still held off by the Origin check."""
UPLOAD_ROUTES = frozenset({"/v1/models/publish"})
"""Routes that take a raw upload (`application/octet-stream`) as well as JSON."""
READ_CHECK_S = 0.5
"""How often the read deadline looks at a body's progress."""
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


class GuardSettings(Protocol):
    """The `[api]` settings the guard reads."""

    @property
    def host(self) -> str: ...

    @property
    def allowed_hosts(self) -> tuple[str, ...]: ...

    @property
    def allowed_origins(self) -> tuple[str, ...]: ...

    @property
    def read_timeout_s(self) -> float: ...


@functools.lru_cache(maxsize=512)
def host_name(value: str) -> str | None:
    """The host part of a `Host` header or `host[:port]` (lower case, IPv6 unbracketed); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            host = value
        elif not port.isdigit() or ":" in host:
            return None
    host = host.rstrip(".")
    if not host or any(c in host for c in " /@\\?#[]\t"):
        return None
    address = _ip(host)
    return str(address) if address is not None else host


def _config_name(text: str) -> str | None:
    """A configured name: an address as it is (`::1`, `10.0.0.5`), else `name[:port]` like a Host header."""
    address = _ip(text.strip().strip("[]"))
    return str(address) if address is not None else host_name(text)


@functools.lru_cache(maxsize=512)
def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address((text or "").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_name(host: str) -> bool:
    """`localhost`, `*.localhost` (RFC 6761: never resolved by DNS) or a loopback address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _ip(host)
    return address is not None and address.is_loopback


@functools.lru_cache(maxsize=512)
def _origin_parts(origin: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True)
class RequestGuard:
    """The node's own names and the web origins allowed to call it."""

    hosts: frozenset[str]
    """Names (lower case) allowed in `Host` besides loopback ones and the connection's local address."""
    any_host: bool
    origins: frozenset[tuple[str, str, int]]
    any_origin: bool
    read_timeout_s: float

    @classmethod
    def from_settings(cls, api: GuardSettings, extra_hosts: Iterable[str] = ()) -> RequestGuard:
        names = {api.host, *extra_hosts, *api.allowed_hosts}
        hosts = {h for h in (_config_name(n) for n in names if n and n not in _WILDCARDS) if h}
        origins = {parts for parts in map(_origin_parts, api.allowed_origins) if parts}
        return cls(
            hosts=frozenset(hosts - {"*"}),
            any_host="*" in api.allowed_hosts,
            origins=frozenset(origins),
            any_origin="*" in api.allowed_origins,
            read_timeout_s=api.read_timeout_s,
        )

    def host_allowed(self, host_header: str | None, local_address: str | None) -> bool:
        if host_header is None:
            return True  # HTTP/1.0 clients; every browser sends Host
        host = host_name(host_header)
        if host is None:
            return False
        if self.any_host or host in self.hosts or is_loopback_name(host):
            return True
        address, local = _ip(host), _ip(local_address)
        return address is not None and address == local

    def origin_allowed(self, origin: str, host_header: str | None, secure: bool) -> bool:
        parts = _origin_parts(origin)
        if parts is None:
            return False  # "null" (sandboxed frames, file://) or garbage
        if self.any_origin or parts in self.origins:
            return True
        if host_header is None:
            return False
        scheme = "https" if secure else "http"
        own = _origin_parts(f"{scheme}://{host_header.strip()}")
        return own is not None and own == parts


GUARD: web.AppKey[RequestGuard] = web.AppKey("guard")
"""The app's guard (`install`)."""


def _refuse(status: int, message: str, code: str) -> ApiError:
    return ApiError(status, message, code=code)


def check_request(guard: RequestGuard, request: web.Request, key: str | None) -> None:
    """Raise the coded ApiError a request gets before its handler runs, or return."""
    host = request.headers.get("Host")
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    local = str(sockname[0]) if isinstance(sockname, tuple) and sockname else None
    if request.path not in SIGNED_PATHS and not guard.host_allowed(host, local):
        raise _refuse(403, f"Host {host!r} is not a name of this node; add it to [api] allowed_hosts if it "
                      "is one", "host_not_allowed")
    origin = request.headers.get("Origin")
    if origin is not None:
        if not guard.origin_allowed(origin, host, request.secure):
            raise _refuse(403, f"requests from web origin {origin[:100]!r} are not allowed; add it to [api] "
                          "allowed_origins to let its pages call this node", "origin_not_allowed")
    elif request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
        navigation = request.headers.get("Sec-Fetch-Mode", "").lower() == "navigate"
        if not (navigation and request.method in SAFE_METHODS):
            raise _refuse(403, "cross-site browser requests are not allowed", "origin_not_allowed")
    if request.method in SAFE_METHODS:
        return
    if not key and not is_loopback_name(request.remote or ""):
        raise _refuse(403, "only local clients may change this node's state (or set [api] key and send it)",
                      "forbidden")
    if request.body_exists:
        _check_media_type(request)


def _check_media_type(request: web.Request) -> None:
    media = request.content_type if "Content-Type" in request.headers else ""
    resource = request.match_info.route.resource
    upload = resource is not None and resource.canonical in UPLOAD_ROUTES
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    if upload and media == "application/octet-stream":
        return
    wanted = "application/json or application/octet-stream" if upload else "application/json"
    raise _refuse(415, f"the body's Content-Type is {media or 'missing'}; send {wanted}",
                  "unsupported_media_type")


async def run_with_read_deadline(
    request: web.Request, handler: Handler, timeout_s: float
) -> web.StreamResponse:
    """Run `handler`; while the body is still arriving, cancel it when no byte came for `timeout_s` (408).
    Once the body is complete the handler has no deadline from here."""
    payload = request.content
    if not request.body_exists or payload.is_eof():
        return await handler(request)
    loop = asyncio.get_running_loop()
    seen, last_progress = payload.total_bytes, loop.time()
    check: asyncio.TimerHandle | None = None
    try:
        async with asyncio.timeout(None) as deadline:

            def watch() -> None:
                nonlocal check, seen, last_progress
                if payload.is_eof():
                    return
                now = loop.time()
                if payload.total_bytes != seen:
                    seen, last_progress = payload.total_bytes, now
                elif now - last_progress >= timeout_s:
                    deadline.reschedule(now)
                    return
                check = loop.call_later(min(READ_CHECK_S, timeout_s), watch)

            check = loop.call_later(min(READ_CHECK_S, timeout_s), watch)
            return await handler(request)
    except TimeoutError:
        if not deadline.expired():
            raise
        logger.info("%s %s from %s: the body stalled for %.0f s; dropped", request.method, request.path,
                    request.remote, timeout_s)
        response = ApiError(408, f"the request body stopped arriving for {timeout_s:g} s",
                            code="request_timeout").response()
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()  # flushes the answer, then closes; no lingering read of the rest
        return response
    finally:
        if check is not None:
            check.cancel()


def _cross_origin(guard: RequestGuard, request: web.BaseRequest) -> str | None:
    """The request's `Origin` when it is an allowed other origin (CORS headers go back to it), else None."""
    origin = request.headers.get("Origin")
    if origin is None or not guard.origin_allowed(origin, None, request.secure):
        return None
    return origin


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = request.app[GUARD]
    check_request(guard, request, request.app[NODE].config.api.key)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if _cross_origin(guard, request) is not None:  # a preflight from an allowed origin
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": "600",
            })
    return await run_with_read_deadline(request, handler, guard.read_timeout_s)


async def _cors_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    origin = _cross_origin(request.app[GUARD], request) if "Origin" in request.headers else None
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.add("Vary", "Origin")


def install(app: web.Application, api: GuardSettings, extra_hosts: Iterable[str] = ()) -> RequestGuard:
    """Store the guard for `guard_middleware` (which must be in the app's middlewares) and send CORS headers
    to allowed origins."""
    guard = RequestGuard.from_settings(api, extra_hosts)
    app[GUARD] = guard
    app.on_response_prepare.append(_cors_headers)
    return guard
