"""Request counts and durations per route template, method and status (pure ASGI middleware)."""

from __future__ import annotations

import time
from typing import Any

from oodserve.observability.metrics import HTTP_METHODS, ServiceMetrics


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
            method = method if method in HTTP_METHODS else "other"
            self.metrics.http_requests.labels(endpoint=endpoint, method=method, status=str(status_code)).inc()
            self.metrics.http_request_duration.labels(endpoint=endpoint, method=method).observe(time.perf_counter() - started)
