"""JSON responses that keep NaN and +-Infinity as the bare tokens Python's json module reads.

Starlette's JSONResponse refuses them (allow_nan=False) and pydantic's JSON mode turns them
into null; a user must see a NaN loss, so every answer goes through `NaNJSONResponse`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse


class NaNJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        if isinstance(content, BaseModel):
            content = content.model_dump()
        return json.dumps(content, ensure_ascii=False, allow_nan=True, separators=(",", ":")).encode()


def respond(model: BaseModel, status_code: int = 200) -> NaNJSONResponse:
    """Return a model without FastAPI re-validating it (the store already built it from the database)."""
    return NaNJSONResponse(model.model_dump(), status_code=status_code)
