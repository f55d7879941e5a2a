"""API tokens: only a token's SHA-256 is stored, so a token is shown once."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from sqlalchemy import delete, select

from mhpo_server.schemas import TokenInfo
from mhpo_server.store.base import Invalid
from mhpo_server.store.engine import Part
from mhpo_server.store.models import ApiTokenRow


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens(Part):
    def create_token(self, project: str, scope: str) -> str:
        if scope not in ("write", "read"):
            raise Invalid(("scope",), f"{scope!r} is not a scope; use write or read")
        token = "mhpo_" + secrets.token_urlsafe(32)
        with self._tx(write=True) as conn:
            conn.execute(
                self._insert(ApiTokenRow.__table__).values(
                    project=project, scope=scope, token_hash=hash_token(token), created_at=time.time()
                )
            )
        return token

    def resolve_token(self, token: str) -> TokenInfo | None:
        with self._tx() as conn:
            row = conn.execute(
                select(ApiTokenRow.id, ApiTokenRow.project, ApiTokenRow.scope).where(
                    ApiTokenRow.token_hash == hash_token(token)
                )
            ).first()
        return None if row is None else TokenInfo(**row._mapping)

    def revoke_token(self, token: str) -> bool:
        with self._tx(write=True) as conn:
            deleted = conn.execute(delete(ApiTokenRow).where(ApiTokenRow.token_hash == hash_token(token)))
        return deleted.rowcount > 0

    def list_tokens(self) -> list[dict[str, Any]]:
        query = select(
            ApiTokenRow.id, ApiTokenRow.project, ApiTokenRow.scope, ApiTokenRow.created_at, ApiTokenRow.token_hash
        ).order_by(ApiTokenRow.id)
        with self._tx() as conn:
            return [
                {
                    "id": r.id,
                    "project": r.project,
                    "scope": r.scope,
                    "created_at": r.created_at,
                    "fingerprint": r.token_hash[:8],
                }
                for r in conn.execute(query)
            ]

    def revoke_token_id(self, token_id: int) -> bool:
        with self._tx(write=True) as conn:
            deleted = conn.execute(delete(ApiTokenRow).where(ApiTokenRow.id == token_id))
        return deleted.rowcount > 0
