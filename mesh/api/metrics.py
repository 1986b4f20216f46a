"""Prometheus metrics of one node, in their own registry (so several nodes can live in one process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class NodeMetrics:
    """Counters, gauges and histograms the API updates; `render()` is the `/metrics` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "shoal_http_requests",
            "HTTP requests by endpoint and status",
            ("endpoint", "method", "status"),
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "shoal_prompt_tokens", "Prompt tokens processed", ("model",), registry=self.registry
        )
        self.completion_tokens = Counter(
            "shoal_completion_tokens", "Completion tokens generated", ("model",), registry=self.registry
        )
        self.completions = Counter(
            "shoal_completions",
            "Completions by model and outcome (stop, length, cancelled, error)",
            ("model", "outcome"),
            registry=self.registry,
        )
        self.ttft = Histogram(
            "shoal_time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.token_latency = Histogram(
            "shoal_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "shoal_queue_depth", "Completion requests waiting for or in generation", registry=self.registry
        )
        self.active_streams = Gauge(
            "shoal_active_sequences", "Sequences the engines currently hold", registry=self.registry
        )
        self.engine_waiting = Gauge(
            "shoal_engine_waiting", "Requests queued for a batch slot in the engines", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
