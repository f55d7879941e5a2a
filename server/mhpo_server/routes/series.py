"""Reading a run's data: keys, scalars (downsampled with min/max), histograms (merged exactly), outliers."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from mhpo_server.deps import ReadAccess, SettingsDep, StoreDep
from mhpo_server.responses import NaNJSONResponse, respond
from mhpo_server.routes.runs import authorized_run
from mhpo_server.schemas import KEY_PATTERN, MAX_STEP, HistogramsOut, Keys, OutliersOut, ScalarsOut, parse_keys

router = APIRouter(prefix="/api/v1/runs", tags=["series"])

StepQuery = Annotated[int | None, Query(ge=0, le=MAX_STEP)]


def _check_range(start: int | None, end: int | None, limit: int, limit_name: str, cap: int) -> None:
    if start is not None and end is not None and start > end:
        raise HTTPException(
            422,
            [
                {
                    "loc": ["query", "start"],
                    "type": "value_error",
                    "msg": f"start={start} is after end={end}; give start <= end",
                }
            ],
        )
    if limit > cap:
        raise HTTPException(
            422,
            [
                {
                    "loc": ["query", limit_name],
                    "type": "less_than_equal",
                    "msg": f"{limit_name}={limit} exceeds the server limit {cap} (MHPO_MAX_POINTS)",
                }
            ],
        )


@router.get("/{run_id}/keys", response_model=Keys)
def get_keys(run_id: uuid.UUID, store: StoreDep, principal: ReadAccess) -> NaNJSONResponse:
    if principal.project is not None:
        authorized_run(store, principal, run_id)
    return respond(store.list_keys(str(run_id)))


@router.get("/{run_id}/scalars", response_model=ScalarsOut)
def get_scalars(
    run_id: uuid.UUID,
    store: StoreDep,
    settings: SettingsDep,
    principal: ReadAccess,
    keys: Annotated[
        str | None,
        Query(
            max_length=100_000,
            pattern=r"^[^\x00-\x1f\x7f]*$",
            description="comma-separated keys (at most 1,000, each 1-250 characters); all when absent",
        ),
    ] = None,
    start: StepQuery = None,
    end: StepQuery = None,
    max_points: Annotated[int, Query(ge=2, le=1_000_000, description="points per series before downsampling")] = 1000,
) -> NaNJSONResponse:
    """Series with at most `max_points` buckets; each bucket keeps its min and max, and flagged steps stay exact."""
    _check_range(start, end, max_points, "max_points", settings.max_points)
    try:
        key_list = parse_keys(keys)
    except ValueError as exc:
        raise HTTPException(422, [{"loc": ["query", "keys"], "type": "value_error", "msg": str(exc)}]) from exc
    if principal.project is not None:
        authorized_run(store, principal, run_id)
    return respond(store.get_scalars(str(run_id), key_list, start, end, max_points))


@router.get("/{run_id}/histograms/{key:path}", response_model=HistogramsOut)
def get_histograms(
    run_id: uuid.UUID,
    key: Annotated[str, Path(max_length=250, pattern=KEY_PATTERN)],
    store: StoreDep,
    settings: SettingsDep,
    principal: ReadAccess,
    start: StepQuery = None,
    end: StepQuery = None,
    max_steps: Annotated[int, Query(ge=1, le=1_000_000, description="columns before merging consecutive steps")] = 500,
) -> NaNJSONResponse:
    _check_range(start, end, max_steps, "max_steps", settings.max_points)
    if principal.project is not None:
        authorized_run(store, principal, run_id)
    return respond(store.get_histograms(str(run_id), key, start, end, max_steps))


@router.get("/{run_id}/outliers", response_model=OutliersOut)
def get_outliers(
    run_id: uuid.UUID,
    store: StoreDep,
    principal: ReadAccess,
    step: Annotated[
        int | None, Query(ge=0, le=MAX_STEP, description="latest step <= this; the last one when absent")
    ] = None,
) -> NaNJSONResponse:
    if principal.project is not None:
        authorized_run(store, principal, run_id)
    return respond(store.get_outliers(str(run_id), step))
