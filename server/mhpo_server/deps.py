"""Typed dependencies: settings, store, alert store, ingest service, metrics and the caller's access, reached per request.

They are coroutines: FastAPI runs a plain-function dependency in its thread pool, a thread hop
per dependency and request (5 of a records request's 6 hops, measured), for what is an
attribute read. Only the token lookup, a database read, is handed to the pool.

Tests build an app with their own `Settings` (`create_app(settings)`); nothing here reads
the environment or opens a database at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from mhpo_server.config import Settings
from mhpo_server.ingest import Ingest
from mhpo_server.metrics import ServiceMetrics
from mhpo_server.schemas import Run
from mhpo_server.store import AlertStore, NotFound, Store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_ingest(request: Request) -> Ingest:
    return request.app.state.ingest


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_alert_store(request: Request) -> AlertStore:
    return request.app.state.alert_store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
IngestDep = Annotated[Ingest, Depends(get_ingest)]
AlertStoreDep = Annotated[AlertStore, Depends(get_alert_store)]

bearer = HTTPBearer(auto_error=False, description="API token from `mhpo token create` (needed when MHPO_AUTH is on)")


@dataclass(frozen=True)
class Principal:
    """Who is calling: with auth off, anyone may do anything; with it on, one project and one scope."""

    project: str | None
    scope: str

    def sees(self, project: str) -> bool:
        return self.project is None or self.project == project

    def check_project(self, project: str) -> None:
        if self.project is not None and self.project != project:
            raise HTTPException(
                403,
                f"this token is for project {self.project!r}, not {project!r}: create one with "
                f"`mhpo token create --project {project} --scope {self.scope}`",
            )


def visible_run(store: Store, principal: Principal, run_id: str) -> Run:
    """The run if this caller may see it; another project's run answers the very 404 of an unknown id,
    so a token learns neither that the run exists nor which project holds it."""
    run = store.get_run(run_id)
    if not principal.sees(run.project):
        raise NotFound.run(run_id)
    return run


async def get_principal(
    settings: SettingsDep,
    store: StoreDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller; the token lookup (a database read) runs in the thread pool, off the event loop."""
    if not settings.auth:
        return Principal(project=None, scope="write")
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401,
            "missing token: send `Authorization: Bearer <token>` (create one with `mhpo token create`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    token = await run_in_threadpool(store.resolve_token, credentials.credentials)
    if token is None:
        raise HTTPException(
            401, "unknown token: create one with `mhpo token create`", headers={"WWW-Authenticate": "Bearer"}
        )
    return Principal(project=token.project, scope=token.scope)


async def require_write(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if principal.scope != "write":
        raise HTTPException(
            403, f"token scope {principal.scope!r} cannot write: use a token created with --scope write"
        )
    return principal


ReadAccess = Annotated[Principal, Depends(get_principal)]
WriteAccess = Annotated[Principal, Depends(require_write)]
