"""GET /api/v1/projects."""

from __future__ import annotations

from fastapi import APIRouter

from mhpo_server.deps import ReadAccess, StoreDep
from mhpo_server.responses import NaNJSONResponse, respond
from mhpo_server.schemas import ProjectList

router = APIRouter(prefix="/api/v1", tags=["projects"])


@router.get("/projects", response_model=ProjectList)
def list_projects(store: StoreDep, principal: ReadAccess) -> NaNJSONResponse:
    projects = store.list_projects()
    if principal.project is not None:
        projects = [p for p in projects if p.name == principal.project]
    return respond(ProjectList(projects=projects))
