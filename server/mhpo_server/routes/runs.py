"""Runs: create (optionally with a client-chosen UUID), set status, list, read."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from mhpo_server.deps import Principal, ReadAccess, SettingsDep, StoreDep, WriteAccess, visible_run
from mhpo_server.responses import NaNJSONResponse, respond
from mhpo_server.schemas import KEY_PATTERN, Run, RunCreate, RunList, RunPatch, config_too_large
from mhpo_server.store import Store

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])


def authorized_run(store: Store, principal: Principal, run_id: uuid.UUID) -> Run:
    """The run, after checking a project-scoped token may see it (404 for an unknown run)."""
    return visible_run(store, principal, str(run_id))


@router.post("", response_model=Run, status_code=201)
def create_run(body: RunCreate, store: StoreDep, settings: SettingsDep, principal: WriteAccess) -> NaNJSONResponse:
    """Idempotent for a client-chosen `run_id`: posting the same run again returns it unchanged.

    The config is bounded: MHPO_MAX_CONFIG_VALUE_BYTES per string, MHPO_MAX_CONFIG_BYTES in all (422 beyond).
    """
    principal.check_project(body.project)
    too_large = config_too_large(body.config or {}, settings.max_config_value_bytes, settings.max_config_bytes)
    if too_large is not None:
        raise HTTPException(422, [{"loc": ["body", "config"], "type": "value_error", "msg": too_large}])
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
