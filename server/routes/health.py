"""Liveness for load balancers and the test fixture, and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from server.deps import MetricsDep

router = APIRouter(tags=["service"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
def metrics(service_metrics: MetricsDep) -> Response:
    """Prometheus text format: requests, latency, rows written, batches, spool replays."""
    return Response(generate_latest(service_metrics.registry), media_type=CONTENT_TYPE_LATEST)
