"""GET /api/v1/runs/{run_id}/events: flags, plus whatever `app.state.event_sources` add (fired alerts)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request

from mhpo_server.deps import ReadAccess, StoreDep
from mhpo_server.responses import NaNJSONResponse
from mhpo_server.routes.runs import authorized_run
from mhpo_server.schemas import EventList

router = APIRouter(prefix="/api/v1/runs", tags=["events"])


@router.get("/{run_id}/events", response_model=EventList)
def list_events(run_id: uuid.UUID, request: Request, store: StoreDep, principal: ReadAccess) -> NaNJSONResponse:
    """Each source is `source(store, run_id) -> list[dict]` with at least "type" and "step"; sorted by step."""
    if principal.project is not None:
        authorized_run(store, principal, run_id)
    events: list[dict[str, Any]] = [e.model_dump() for e in store.list_events(str(run_id))]
    for source in request.app.state.event_sources:
        events.extend(source(store, str(run_id)))
    events.sort(key=lambda e: (e.get("step") or 0, e.get("created_at") or 0.0))
    return NaNJSONResponse({"events": events})
