"""Prometheus metrics of the service (oodserve_ prefix, base units) and the ASGI middleware that counts requests."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from service.scoring.pipeline import BatchScores

disable_created_metrics()  # the *_created series only double the exposition size

P_VALUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    """All metrics in one private registry (so several apps in one process never collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.http_requests = Counter(
            "oodserve_http_requests",
            "HTTP requests by route template, method and status code.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.http_request_duration = Histogram(
            "oodserve_http_request_duration_seconds",
            "Wall time of HTTP requests by route template and method.",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inputs_scored = Counter(
            "oodserve_inputs_scored",
            "Instances scored, by model and verdict (ood or in_distribution).",
            ["model", "verdict"],
            registry=self.registry,
        )
        self.signal_p_value = Histogram(
            "oodserve_signal_p_value",
            "Conformal p-value of each signal per scored instance (uniform on in-distribution data).",
            ["model", "signal"],
            buckets=P_VALUE_BUCKETS,
            registry=self.registry,
        )
        self.fused_p_value = Histogram(
            "oodserve_fused_p_value",
            "Conformal p-value of the fused statistic per scored instance; is_ood when below alpha.",
            ["model"],
            buckets=P_VALUE_BUCKETS,
            registry=self.registry,
        )
        self.batch_instances = Histogram(
            "oodserve_batch_instances",
            "Instances per score request.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.scoring_duration = Histogram(
            "oodserve_scoring_duration_seconds",
            "Time to validate and score one request's batch (onnxruntime plus numpy).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Gauge(
            "oodserve_model_info",
            "Served bundles: name, version and the active onnxruntime execution provider (value 1).",
            ["model", "version", "provider"],
            registry=self.registry,
        )
        self.ready = Gauge("oodserve_ready", "1 when bundles are loaded and warmed up, else 0.", registry=self.registry)

    def observe_batch(self, model: str, scores: BatchScores, seconds: float) -> None:
        """Record one scored batch: verdict counts, per-signal and fused p-values, batch size, time."""
        batch_size = int(scores.is_ood.size)
        ood_count = int(scores.is_ood.sum())
        if ood_count:
            self.inputs_scored.labels(model=model, verdict="ood").inc(ood_count)
        if batch_size - ood_count:
            self.inputs_scored.labels(model=model, verdict="in_distribution").inc(batch_size - ood_count)
        for signal, p_values in scores.p_values.items():
            histogram = self.signal_p_value.labels(model=model, signal=signal)
            for value in p_values.tolist():
                histogram.observe(value)
        fused = self.fused_p_value.labels(model=model)
        for value in scores.fused_p_value.tolist():
            fused.observe(value)
        self.batch_instances.labels(model=model).observe(batch_size)
        self.scoring_duration.labels(model=model).observe(seconds)


class RequestMetricsMiddleware:
    """Pure ASGI middleware: counts requests and times them, labelled by route template (not raw path)."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_and_record_status(message: dict[str, Any]) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.http_requests.labels(endpoint=endpoint, method=method, status=str(status_code)).inc()
            self.metrics.http_request_duration.labels(endpoint=endpoint, method=method).observe(time.perf_counter() - started)
