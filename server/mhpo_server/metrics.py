"""Prometheus metrics of the service itself, one registry per app (so test apps never collide)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mhpo_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mhpo_http_request_duration_seconds",
            "time to answer a request",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.rows = Counter("mhpo_rows_written", "rows newly stored", ["table"], registry=self.registry)
        self.batches = Counter("mhpo_batches", "record batches received", ["result"], registry=self.registry)
        self.spool_replays = Counter(
            "mhpo_spool_replays",
            "record batches a client replayed from its on-disk spool (request header X-MHPO-Replay: 1)",
            registry=self.registry,
        )
        self.reads_abandoned = Counter(
            "mhpo_reads_abandoned", "long reads stopped because the client went away", registry=self.registry
        )
        self.listener_errors = Counter(
            "mhpo_ingest_listener_errors", "ingest listeners that raised", ["listener"], registry=self.registry
        )


class MetricsMiddleware:
    """Counts and times every HTTP request by route template (not raw path: bounded label set)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
