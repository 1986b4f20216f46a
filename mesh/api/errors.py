"""`ApiError`: an HTTP error in OpenAI's body shape, `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from shoal.mesh.route import RouteFailed

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """Raised by handlers; the error middleware turns it into a JSON response with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    """A 400 for a bad parameter."""
    return ApiError(400, message, param=param, code=code)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS),
        content_type="application/json",
        headers=headers,
    )


def route_error(exc: RouteFailed) -> ApiError:
    """A request that could not be routed (`mesh.route.RouteFailed`: a peer refused, failed or is over
    quota, or no device can take it), as its coded error: 503 or 429, never a 500."""
    return ApiError(exc.status, exc.message, code=exc.code)


def route_error_headers(exc: RouteFailed) -> dict[str, str]:
    """`Retry-After` where the peer said when to come back; `x-should-retry: false` (the `openai` client
    honours it) for a refusal, which asking again would only repeat."""
    headers: dict[str, str] = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(exc.retry_after_s + 0.999)))
    if exc.code in ("peer_refused", "no_route", "peer_bad_request", "peer_quota"):
        headers["x-should-retry"] = "false"
    return headers
