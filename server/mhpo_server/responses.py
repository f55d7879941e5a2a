"""Strict JSON responses that keep NaN and +-Infinity as the strings "NaN", "Infinity", "-Infinity".

JSON has no token for them: Starlette's JSONResponse refuses them (allow_nan=False), pydantic's
JSON mode turns them into null, Python's json module writes bare NaN / Infinity that a browser's
JSON.parse and most languages' parsers refuse. A user must see a NaN loss, so every answer goes
through `NaNJSONResponse`, which writes them as protobuf's JSON mapping (MLflow's) does.

Text with no UTF-8 form (a lone surrogate: stored before the server refused it, or echoed
in a validation error's location) is sent as U+FFFD rather than failing the whole answer,
so one bad row never breaks a list for everyone.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse

from mhpo_server.schemas import SURROGATE_RE

# A string literal (kept as it is) or a bare non-finite token (quoted): one pass, strings skipped.
BARE_NON_FINITE = re.compile(r'("(?:[^"\\]|\\.)*")|(-?Infinity|NaN)')


def _quote(found: re.Match[str]) -> str:
    return found.group(1) if found.group(1) is not None else f'"{found.group(2)}"'


def strict_json(content: Any) -> str:
    """`content` as JSON text with non-finite floats written as the strings "NaN", "Infinity", "-Infinity"."""
    text = json.dumps(content, ensure_ascii=False, allow_nan=True, separators=(",", ":"))
    if "NaN" in text or "Infinity" in text:
        text = BARE_NON_FINITE.sub(_quote, text)
    return text


class NaNJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        if isinstance(content, BaseModel):
            content = content.model_dump()
        text = strict_json(content)
        try:
            return text.encode()
        except UnicodeEncodeError:
            return SURROGATE_RE.sub("\ufffd", text).encode()


def respond(model: BaseModel, status_code: int = 200) -> NaNJSONResponse:
    """Return a model without FastAPI re-validating it (the store already built it from the database)."""
    return NaNJSONResponse(model.model_dump(), status_code=status_code)
