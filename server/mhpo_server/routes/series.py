"""Reading a run's data: keys, scalars (downsampled with min/max), histograms (merged exactly), outliers."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from pydantic import StringConstraints
from starlette.concurrency import run_in_threadpool

from mhpo_server.deps import MetricsDep, ReadAccess, SettingsDep, StoreDep
from mhpo_server.metrics import ServiceMetrics
from mhpo_server.responses import NaNJSONResponse, respond
from mhpo_server.routes.runs import authorized_run
from mhpo_server.schemas import (
    KEY_PATTERN,
    MAX_STEP,
    HistogramsOut,
    Keys,
    OutliersOut,
    ScalarsOut,
    Series,
    parse_keys,
)

router = APIRouter(prefix="/api/v1/runs", tags=["series"])

StepQuery = Annotated[int | None, Query(ge=0, le=MAX_STEP)]
KEYS_PER_CHUNK = 50  # keys read per store call; whether the client is still there is checked between calls
CLIENT_GONE = 499  # nobody reads it: the status logged for a read abandoned because its client left


async def client_gone(request: Request, metrics: ServiceMetrics) -> bool:
    """Whether the client of a long read has gone away (then counted): checked between its steps."""
    if await request.is_disconnected():
        metrics.reads_abandoned.inc()
        return True
    return False


def limit_error(loc: list[str], msg: str) -> HTTPException:
    """The 422 of a request over a server limit: `msg` names the limit, its setting and the fix."""
    return HTTPException(422, [{"loc": loc, "type": "value_error", "msg": msg}])


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
async def get_scalars(
    run_id: uuid.UUID,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    principal: ReadAccess,
    keys: Annotated[
        str | None,
        Query(
            max_length=100_000,
            pattern=r"^[^\x00-\x1f\x7f]*$",
            description="comma-separated keys (for keys without a comma); with `key=`, the run's keys when both "
            "are absent (refused when the run has more than MHPO_MAX_KEYS_PER_READ)",
        ),
    ] = None,
    key: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=250, pattern=KEY_PATTERN)]] | None,
        Query(description="one key per `key=`, taken as it is (a key may hold a comma); repeat it for several"),
    ] = None,
    start: StepQuery = None,
    end: StepQuery = None,
    max_points: Annotated[int, Query(ge=2, le=1_000_000, description="points per series before downsampling")] = 1000,
) -> Response:
    """Series with at most `max_points` buckets; each bucket keeps its min and max, and flagged steps stay exact.

    Bounded: at most MHPO_MAX_KEYS_PER_READ keys and MHPO_MAX_POINTS_PER_READ points (keys x
    max_points) per read. The keys are read a few at a time, and a client that goes away
    stops the read between two of them.
    """
    _check_range(start, end, max_points, "max_points", settings.max_points)
    limit = settings.max_keys_per_read
    try:
        key_list = parse_keys(keys, key or (), limit)
    except ValueError as exc:
        raise HTTPException(422, [{"loc": ["query", "keys"], "type": "value_error", "msg": str(exc)}]) from exc
    if principal.project is not None:
        await run_in_threadpool(authorized_run, store, principal, run_id)
    if not key_list:
        key_list = await run_in_threadpool(store.scalar_keys, str(run_id), limit + 1)
        if len(key_list) > limit:
            raise limit_error(
                ["query", "keys"],
                f"the run has more than {limit} scalar keys, the most one read returns (MHPO_MAX_KEYS_PER_READ): "
                f"name the keys to read with key=... (list them with GET /api/v1/runs/{run_id}/keys)",
            )
    points = len(key_list) * max_points
    if points > settings.max_points_per_read:
        raise limit_error(
            ["query", "max_points"],
            f"{len(key_list)} keys x max_points={max_points} = {points} points exceed the limit of "
            f"{settings.max_points_per_read} per read (MHPO_MAX_POINTS_PER_READ): ask for fewer keys with key= "
            "or a smaller max_points",
        )
    series: dict[str, Series] = {}
    downsampled = False
    for i in range(0, len(key_list), KEYS_PER_CHUNK):
        if await client_gone(request, metrics):
            return Response(status_code=CLIENT_GONE)
        part = await run_in_threadpool(
            store.get_scalars, str(run_id), key_list[i : i + KEYS_PER_CHUNK], start, end, max_points
        )
        series.update(part.series)
        downsampled = downsampled or part.downsampled
    return respond(ScalarsOut(run_id=str(run_id), downsampled=downsampled, series=series))


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
    return respond(store.get_histograms(str(run_id), key, start, end, max_steps, settings.max_histogram_cells))


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
