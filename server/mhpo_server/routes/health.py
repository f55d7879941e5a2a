"""Liveness and state for load balancers and operators, and the Prometheus scrape endpoint."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from mhpo_server.deps import MetricsDep, SettingsDep, StoreDep
from mhpo_server.store import Unavailable

router = APIRouter(tags=["service"])


@router.get("/healthz")
def healthz(request: Request, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """Always 200 while the process answers; `status` is "degraded" when the database does not answer,
    the latest write failed (read-only file, full disk, database down) or an ingest listener's latest call failed.
    `evaluation` counts the runs whose stored steps are ahead of their flags and alert rules (for a moment
    after each batch; for longer after a crash, until they are caught up) and the largest gap in steps.

    It needs no token, so with auth on it gives the states and reasons but not the error
    texts or run ids (those are in the server log and in the run's events).
    """
    try:
        store.ping()
        database: dict[str, Any] = {"ok": True}
    except Unavailable as exc:
        database = {"ok": False, "reason": exc.reason, "error": str(exc)}
    writes = store.write_health.snapshot()
    listeners = request.app.state.listener_health.snapshot()
    healthy = database["ok"] and writes["ok"] and all(state["ok"] for state in listeners.values())
    if settings.auth:
        database.pop("error", None)
        if writes["last_failure"] is not None:
            writes["last_failure"] = {"reason": writes["last_failure"]["reason"], "at": writes["last_failure"]["at"]}
        for state in listeners.values():
            if state.get("last_failure") is not None:
                state["last_failure"] = {"at": state["last_failure"]["at"]}
    return {
        "status": "ok" if healthy else "degraded",
        "database": database,
        "writes": writes,
        "ingest_listeners": listeners,
        "evaluation": request.app.state.ingest.lag() if database["ok"] else None,
    }


@router.get("/metrics", include_in_schema=False)
def metrics(service_metrics: MetricsDep) -> Response:
    """Prometheus text format: requests, latency, rows written, batches, spool replays, listener errors."""
    return Response(generate_latest(service_metrics.registry), media_type=CONTENT_TYPE_LATEST)
