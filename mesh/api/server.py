"""`api_runner(app, ...)`: the `AppRunner` that serves the node's app, with two changes to aiohttp's server:

- Requests aiohttp refuses before any handler runs (malformed HTTP, a `Content-Encoding` it cannot decode such
  as `br` without the Brotli package, over-long headers) get the API's JSON error body, not plain text.
- A connection whose request headers do not arrive within `read_timeout_s` (of connecting, or of the last
  answer on a kept-alive connection) is closed: aiohttp's keep-alive timer, which also ends idle connections.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from shoal.mesh.api.errors import ApiError

logger = logging.getLogger(__name__)


def _parser_error(status: int, exc: BaseException | None, message: str | None) -> ApiError:
    if status >= 500:
        return ApiError(status, "internal error; see the node's log", type="server_error")
    text = exc.message if isinstance(exc, HttpProcessingError) else None
    text = text or message or HTTPStatus(status).phrase
    text = " ".join(str(text).split())[:300]
    if isinstance(exc, ContentEncodingError):
        return ApiError(400, f"the body cannot be decoded: {text}", code="invalid_encoding")
    if isinstance(exc, LineTooLong):
        return ApiError(status, f"a request line or header is too long: {text}", code="header_too_large")
    return ApiError(status, f"malformed HTTP request: {text}", code="bad_request")


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors (parser failures) in the API's JSON shape."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; cannot send an error")
        if status >= 500:
            self.log_exception("error handling a request from %s", request.remote, exc_info=exc)
        else:
            logger.info("refused a malformed request from %s: %s", request.remote, exc or message)
        response = _parser_error(status, exc, message).response()
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """`AppRunner` whose connections are `JsonErrorRequestHandler`s."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same object and state; only the protocol factory differs
        return server


def api_runner(app: web.Application, *, read_timeout_s: float, shutdown_timeout: float) -> web.AppRunner:
    return ApiRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
        access_log=None,
        keepalive_timeout=read_timeout_s,
    )
