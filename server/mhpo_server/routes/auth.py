"""GET /api/v1/auth/whoami: what the caller's token may do (the dashboard's login checks a token with it)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from mhpo_server.deps import ReadAccess, SettingsDep
from mhpo_server.schemas import Scope

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


class WhoAmI(BaseModel):
    """`auth` false: anyone may do anything (project null, scope write)."""

    auth: bool
    project: str | None
    scope: Scope


@router.get("/whoami", response_model=WhoAmI)
def whoami(settings: SettingsDep, principal: ReadAccess) -> WhoAmI:
    return WhoAmI(auth=settings.auth, project=principal.project, scope=principal.scope)
