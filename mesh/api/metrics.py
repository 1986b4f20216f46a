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
            "shoal_engine_waiting",
            "Requests waiting for admission (a batch slot and room in the KV cache) in the engines",
            registry=self.registry,
        )
        self.admission_wait = Histogram(
            "shoal_admission_wait_seconds",
            "Time a request waited for room in the KV cache before it started",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.admission_refused = Counter(
            "shoal_admission_refused",
            "Requests refused by KV admission (queue_full: 429; timeout: 503)",
            ("model", "reason"),
            registry=self.registry,
        )
        self.kv_reserved = Gauge(
            "shoal_kv_reserved_tokens", "KV-cache tokens reserved by running requests", registry=self.registry
        )
        self.kv_capacity = Gauge(
            "shoal_kv_capacity_tokens", "KV-cache tokens the loaded engines hold", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
