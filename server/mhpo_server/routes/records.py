"""A run's history: POST .../records (idempotent ingest of a batch, one transaction, contract C1),
POST .../rewind (the history ends at a step) and POST .../fork (a new run sharing the history up to a step)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, Request

from mhpo_server.deps import IngestDep, SettingsDep, StoreDep, WriteAccess
from mhpo_server.responses import NaNJSONResponse, respond
from mhpo_server.routes.runs import authorized_run
from mhpo_server.schemas import ForkIn, RecordsIn, RecordsOut, RewindIn, RewindOut, Run

router = APIRouter(prefix="/api/v1/runs", tags=["records"])


@router.post("/{run_id}/records", response_model=RecordsOut)
def post_records(
    run_id: uuid.UUID,
    body: RecordsIn,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    ingest: IngestDep,
    principal: WriteAccess,
) -> NaNJSONResponse:
    """Stores the batch in one transaction, committed before answering; then evaluates flags and alert rules.

    A batch id seen before for this run stores nothing (all items count as duplicates); items
    already stored under (run, key, step) by another batch are skipped and counted too. An
    invalid item (bad key, non-number scalar, bad histogram or outlier, a histogram binning
    that differs from the run's) is refused alone and listed in `rejected`; the rest is stored.
    """
    if len(body.records) > settings.max_records_per_batch:
        raise HTTPException(
            422,
            [
                {
                    "loc": ["body", "records"],
                    "type": "too_long",
                    "msg": f"{len(body.records)} records exceed the limit of {settings.max_records_per_batch} per batch "
                    "(MHPO_MAX_RECORDS_PER_BATCH); split the batch",
                }
            ],
        )
    if principal.project is not None:
        authorized_run(store, principal, run_id)
    result = ingest.write(
        str(run_id),
        body.batch_id,
        body.records,
        body.rejected_items,
        replay=request.headers.get("x-mhpo-replay") == "1",
    )
    return respond(RecordsOut(accepted=result.accepted, duplicates=result.duplicates, rejected=result.rejected))


@router.post("/{run_id}/rewind", response_model=RewindOut, tags=["runs"])
def rewind_run(
    run_id: uuid.UUID, body: RewindIn, store: StoreDep, ingest: IngestDep, principal: WriteAccess
) -> NaNJSONResponse:
    """The run's history ends at `step`: later scalars, histograms, outliers and flags are deleted,
    later fired alerts are marked rewound, and later steps may be logged again as new.

    Idempotent. Batch ids sent before stay known, so a pre-rewind batch re-sent later stores nothing.
    """
    authorized_run(store, principal, run_id)
    result = ingest.rewind(str(run_id), body.step)
    return respond(result)


@router.post("/{run_id}/fork", response_model=Run, status_code=201, tags=["runs"])
def fork_run(
    run_id: uuid.UUID, body: ForkIn, store: StoreDep, ingest: IngestDep, principal: WriteAccess
) -> NaNJSONResponse:
    """A new run in the parent's project with a copy of its history up to `step` (flags included);
    it carries `parent_run_id` and `fork_step` and continues on its own."""
    authorized_run(store, principal, run_id)
    return respond(ingest.fork(str(run_id), body.step, body.name), status_code=201)
