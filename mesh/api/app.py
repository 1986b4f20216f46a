"""The node's aiohttp application: `create_app(node, router=..., routes=...)`.

Middlewares, outermost first: metrics (requests by endpoint and status), errors (every failure becomes an
OpenAI-style error body, never a traceback), guard (Host, Origin, media type, read deadline:
`mesh/api/guard.py`), auth (`Authorization: Bearer KEY` when the node has a key).
Every response carries `x-shoal-route`. On shutdown, in-flight completions get `shutdown_grace_s` to finish
and are then cancelled (streams end with an error chunk and `data: [DONE]`); event streams end at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from aiohttp import web
from shoal.mesh.api import admin as api_admin
from shoal.mesh.api import anthropic_routes as api_anthropic
from shoal.mesh.api import embeddings_routes as api_embeddings
from shoal.mesh.api import guard as api_guard
from shoal.mesh.api import join_page
from shoal.mesh.api import ollama_routes as api_ollama
from shoal.mesh.api import openai_routes as api_openai
from shoal.mesh.api import responses_routes as api_responses
from shoal.mesh.api.errors import ApiError, route_error, route_error_headers
from shoal.mesh.api.keys import INFLIGHT, NODE, ROUTE_HEADER, ROUTER
from shoal.mesh.route import RouteFailed
from shoal.models.errors import (
    ContextOverflowError,
    ModelError,
    ModelFileError,
    ModelMemoryBudgetError,
    ModelNotFoundError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from shoal.mesh.api.ports import NodePort, RouterPort

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BUDGET_RETRY_AFTER_S = 5
"""`Retry-After` of a load refused by the memory budget while busy models hold the room."""
OPEN_PATHS = frozenset({"/health", "/v1/mesh/signal", *join_page.PATHS})
"""Paths served without the API key (liveness probes; mesh signalling, which carries its own signed proof;
the join page, which holds nothing secret)."""


def _endpoint(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        request.app[NODE].metrics.requests.labels(_endpoint(request), request.method, str(status)).inc()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except ModelNotFoundError as exc:
        return ApiError(404, str(exc), param="model", code="model_not_found").response()
    except ContextOverflowError as exc:
        return ApiError(400, str(exc), code="context_length_exceeded").response()
    except RouteFailed as exc:
        logger.info("%s %s: %s (%s)", request.method, request.path, exc.message, exc.code)
        return route_error(exc).response(headers=route_error_headers(exc))
    except web.RequestPayloadError as exc:  # a body that does not decode (gzip/deflate) or breaks off
        return _payload_error(request, exc).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.content_type == "application/json" and exc.body:  # a route's own coded error body
            return web.Response(status=exc.status, body=exc.body, content_type="application/json",
                                headers=_allow_header(exc))
        return _http_error(exc).response(headers=_allow_header(exc))
    except ModelMemoryBudgetError as exc:  # busy models hold the room: worth a retry; else it never fits
        headers = {"Retry-After": str(BUDGET_RETRY_AFTER_S)} if exc.retryable else None
        error = ApiError(503, str(exc), param="model", code="model_memory_budget", type="server_error")
        return error.response(headers=headers)
    except UnsupportedModelError as exc:
        return ApiError(422, str(exc), param="model", code="unsupported_model").response()
    except ModelFileError as exc:
        return ApiError(422, str(exc), param="model", code="invalid_model_file").response()
    except ModelError as exc:
        logger.warning("%s %s: %s", request.method, request.path, exc)
        return ApiError(500, str(exc), code="model_error", type="server_error").response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return ApiError(500, "internal error; see the node's log", type="server_error").response()


def _payload_error(request: web.Request, exc: web.RequestPayloadError) -> ApiError:
    encoding = request.headers.get("Content-Encoding")
    if encoding:
        message = f"the body is not valid {encoding[:40]} (its Content-Encoding)"
        return ApiError(400, message, code="invalid_encoding")
    return ApiError(400, f"the request body is malformed: {exc}"[:300], code="invalid_body")


def _http_error(exc: web.HTTPException) -> ApiError:
    if isinstance(exc, web.HTTPNotFound):
        return ApiError(404, "no such endpoint; see GET /v1/models and the API docs", code="unknown_url")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return ApiError(
            405, f"method {exc.method} is not allowed here (allowed: {allowed})", code="method_not_allowed"
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError(413, f"the request body is too large: {exc.text}", code="request_too_large")
    text = " ".join((exc.text or "").split())[:300]  # a handler's text; aiohttp's default: "400: Bad Request"
    message = text if text and text != f"{exc.status}: {exc.reason}" else exc.reason
    return ApiError(exc.status, message, code=exc.reason.lower().replace(" ", "_").replace("-", "_"))


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[NODE].config.api.key
    if key and request.path not in OPEN_PATHS:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                type="authentication_error",
            )
    return await handler(request)


async def _route_header(request: web.Request, response: web.StreamResponse) -> None:
    if ROUTE_HEADER not in response.headers:
        response.headers[ROUTE_HEADER] = "local"


async def _drain(app: web.Application) -> None:
    """on_shutdown: end event streams, give completions the grace period, then cancel the rest."""
    node = app[NODE]
    node.begin_drain()
    inflight = set(app[INFLIGHT])
    if inflight:
        grace = node.config.api.shutdown_grace_s
        logger.info("waiting up to %.1f s for %d request(s) in flight", grace, len(inflight))
        _, pending = await asyncio.wait(inflight, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            logger.info("cancelled %d request(s) still running at shutdown", len(pending))
            await asyncio.wait(pending, timeout=5.0)


def create_app(
    node: NodePort,
    *,
    router: RouterPort | None = None,
    routes: Iterable[Callable[[web.Application], None]] = (),
    own_hosts: Iterable[str] = (),
) -> web.Application:
    """The node's app: the OpenAI and admin routes, plus `routes` (each adds a subsystem's routes).
    Completions stream through `router` when given, else from the local engine. `own_hosts`: more names
    of this node clients may send in `Host` (e.g. `[mesh] advertise`)."""
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, api_guard.guard_middleware, auth_middleware],
        client_max_size=node.config.api.max_body_bytes,
    )
    api_guard.install(app, node.config.api, own_hosts)
    app[NODE] = node
    app[ROUTER] = router
    app[INFLIGHT] = set()
    app.on_response_prepare.append(_route_header)
    app.on_shutdown.append(_drain)
    api_openai.add_routes(app)
    api_admin.add_routes(app)
    api_ollama.add_routes(app)
    api_anthropic.add_routes(app)
    api_embeddings.add_routes(app)
    api_responses.add_routes(app)
    join_page.add_routes(app)
    for add_routes in routes:
        add_routes(app)
    return app
