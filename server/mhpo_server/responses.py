"""JSON responses that keep NaN and +-Infinity as the bare tokens Python's json module reads.

Starlette's JSONResponse refuses them (allow_nan=False) and pydantic's JSON mode turns them
into null; a user must see a NaN loss, so every answer goes through `NaNJSONResponse`.

Text with no UTF-8 form (a lone surrogate: stored before the server refused it, or echoed
in a validation error's location) is sent as U+FFFD rather than failing the whole answer,
so one bad row never breaks a list for everyone.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse

from mhpo_server.schemas import SURROGATE_RE


class NaNJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        if isinstance(content, BaseModel):
            content = content.model_dump()
        text = json.dumps(content, ensure_ascii=False, allow_nan=True, separators=(",", ":"))
        try:
            return text.encode()
        except UnicodeEncodeError:
            return SURROGATE_RE.sub("\ufffd", text).encode()


def respond(model: BaseModel, status_code: int = 200) -> NaNJSONResponse:
    """Return a model without FastAPI re-validating it (the store already built it from the database)."""
    return NaNJSONResponse(model.model_dump(), status_code=status_code)
