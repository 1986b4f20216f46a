"""Requests the engine's KV admission turned away (models/admission.py), as OpenAI-style errors.

A full admission queue is `429 queue_full` (OpenAI's rate-limit status: clients such as the `openai` package
retry it after `Retry-After`); a request that waited past `[models] queue_timeout_s` is `503
queue_timeout`. Both carry `Retry-After` (whole seconds, the engine's estimate) and count in
`shoal_admission_refused{model, reason}`.
"""

from __future__ import annotations

from aiohttp import web
from shoal.mesh.api.errors import ApiError
from shoal.mesh.api.metrics import NodeMetrics
from shoal.models.admission import AdmissionError, QueueFullError


def refusal(exc: AdmissionError) -> ApiError:
    if isinstance(exc, QueueFullError):
        return ApiError(429, str(exc), code="queue_full", type="rate_limit_error")
    return ApiError(503, str(exc), code="queue_timeout", type="server_error")


def refused_response(metrics: NodeMetrics, model: str, exc: AdmissionError) -> web.Response:
    """The error response for `exc`, with `Retry-After`; counted in the metrics."""
    error = refusal(exc)
    reason = "queue_full" if error.status == 429 else "timeout"
    metrics.admission_refused.labels(model, reason).inc()
    return error.response(headers={"Retry-After": str(max(1, int(exc.retry_after_s)))})
