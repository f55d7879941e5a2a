"""Runs: create (optionally with a client-chosen UUID), set status, list, read."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from mhpo_server.deps import Principal, ReadAccess, StoreDep, WriteAccess
from mhpo_server.responses import NaNJSONResponse, respond
from mhpo_server.schemas import KEY_PATTERN, Run, RunCreate, RunList, RunPatch
from mhpo_server.store import Store

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])


def authorized_run(store: Store, principal: Principal, run_id: uuid.UUID) -> Run:
    """The run, after checking a project-scoped token may see it (404 for an unknown run)."""
    run = store.get_run(str(run_id))
    principal.check_project(run.project)
    return run


@router.post("", response_model=Run, status_code=201)
def create_run(body: RunCreate, store: StoreDep, principal: WriteAccess) -> NaNJSONResponse:
    """Idempotent for a client-chosen `run_id`: posting the same run again returns it unchanged."""
    principal.check_project(body.project)
    return respond(store.create_run(body), status_code=201)


@router.patch("/{run_id}", response_model=Run)
def update_run(run_id: uuid.UUID, body: RunPatch, store: StoreDep, principal: WriteAccess) -> NaNJSONResponse:
    authorized_run(store, principal, run_id)
    return respond(store.update_run(str(run_id), body.status))


@router.get("", response_model=RunList)
def list_runs(
    store: StoreDep,
    principal: ReadAccess,
    project: Annotated[
        str | None, Query(max_length=200, pattern=KEY_PATTERN, description="only this project's runs")
    ] = None,
) -> NaNJSONResponse:
    if principal.project is not None:
        principal.check_project(project or principal.project)
        project = principal.project
    return respond(RunList(runs=store.list_runs(project)))


@router.get("/{run_id}", response_model=Run)
def get_run(run_id: uuid.UUID, store: StoreDep, principal: ReadAccess) -> NaNJSONResponse:
    return respond(authorized_run(store, principal, run_id))
