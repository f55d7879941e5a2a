"""Pydantic v2 models at the edge of the API (DESIGN 3.1, contracts C1 and C7).

The store returns these too (never ORM rows). Timestamps are unix seconds (float), the
same unit as a record's `time`. Non-finite floats travel as the JSON tokens NaN /
Infinity / -Infinity, as Python's json module reads and writes them.
"""

from __future__ import annotations

import math
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)

MAX_STEP = 2**53
MAX_BINS = 10_000
MAX_KEYS_PER_RECORD = 10_000
MAX_OUTLIERS_PER_RECORD = 1_000
KEY_PATTERN = r"^[^\x00-\x1f\x7f]+$"

Key = Annotated[str, StringConstraints(min_length=1, max_length=250, pattern=KEY_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=KEY_PATTERN)]
Step = Annotated[int, Field(ge=0, le=MAX_STEP)]
Count = Annotated[int, Field(ge=0, le=2**62)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
RunStatus = Literal["running", "finished", "failed", "crashed"]
Severity = Literal["info", "warning", "critical"]
Scope = Literal["write", "read"]


class _In(BaseModel):
    """Inputs refuse unknown fields so a typo gets a 422 naming it instead of silently vanishing."""

    model_config = ConfigDict(extra="forbid")


class HistogramIn(_In):
    lo: FiniteFloat
    hi: FiniteFloat
    counts: Annotated[list[Count], Field(min_length=1, max_length=MAX_BINS)]
    underflow: Count = 0
    overflow: Count = 0
    min: float = math.nan
    max: float = math.nan
    sum: float = 0.0
    sumsq: float = 0.0

    @model_validator(mode="after")
    def _bounds(self) -> HistogramIn:
        if not self.lo < self.hi:
            raise ValueError(f"lo must be < hi (got lo={self.lo}, hi={self.hi})")
        return self


class OutlierIn(_In):
    sample: Annotated[int, Field(ge=0, le=2**31)]
    position: Annotated[int, Field(ge=0, le=2**31)]
    token_id: Annotated[int, Field(ge=0, le=2**31)] | None = None
    text: Annotated[str, Field(max_length=1000)] = ""
    x: float
    A: float
    zeta: float | None = None


ItemField = Literal["scalars", "histograms", "outliers"]


class RejectedItem(BaseModel):
    """One item of a record the server refused while storing the rest of the record and batch."""

    step: int
    field: ItemField
    key: str | None = Field(description="the scalar or histogram key; null for the outlier list")
    reason: str


def _item_of(loc: tuple[str | int, ...]) -> tuple[int, ItemField, str | None] | None:
    """(record index, field, key) of the item an error of a batch belongs to; None for any other error."""
    if len(loc) < 4 or loc[0] != "records" or not isinstance(loc[1], int):
        return None
    if loc[2] in ("scalars", "histograms"):
        return loc[1], loc[2], str(loc[3])  # type: ignore[return-value]
    if loc[2] == "outliers" and isinstance(loc[3], int):
        return loc[1], "outliers", None
    return None


class RecordIn(_In):
    step: Step
    time: Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)] | None = None
    scalars: Annotated[dict[Key, float], Field(max_length=MAX_KEYS_PER_RECORD)] = {}
    histograms: Annotated[dict[Key, HistogramIn], Field(max_length=1_000)] = {}
    outliers: Annotated[list[OutlierIn], Field(max_length=MAX_OUTLIERS_PER_RECORD)] = []

    def items(self) -> int:
        """Stored items: one per scalar, one per histogram, one for the outlier list if any."""
        return len(self.scalars) + len(self.histograms) + (1 if self.outliers else 0)


class RecordsIn(_In):
    """A batch. An invalid item of a record (a bad key, a non-number scalar, a bad histogram or
    outlier list) is refused alone, left out of `records` and listed in `rejected_items`; an
    invalid envelope, step, time or record shape refuses the whole request."""

    batch_id: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    records: list[RecordIn]
    _rejected: list[RejectedItem] = PrivateAttr(default_factory=list)

    @property
    def rejected_items(self) -> list[RejectedItem]:
        return self._rejected

    @model_validator(mode="wrap")
    @classmethod
    def _refuse_bad_items(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> RecordsIn:
        """Validate; if only items failed, drop them, validate the rest, and remember why each was dropped.

        One Python call per batch on the valid path: the per-item work happens only after a failure.
        """
        try:
            return handler(data)
        except ValidationError as exc:
            errors = exc.errors()
            items = [_item_of(tuple(e["loc"])) for e in errors]
            if any(item is None for item in items) or not isinstance(data, dict):
                raise
        reasons: dict[tuple[int, ItemField, str | None], list[str]] = {}
        for item, error in zip(items, errors, strict=True):
            assert item is not None
            loc = error["loc"][3:] if item[1] == "outliers" else error["loc"][4:]
            where = ".".join("key" if part == "[key]" else str(part) for part in loc)
            reasons.setdefault(item, []).append(f"{where}: {error['msg']}" if where else error["msg"])
        records = list(data["records"])
        for i, field_name, key in reasons:
            record = records[i] = dict(records[i])
            if field_name == "outliers":
                record["outliers"] = []
            else:
                record[field_name] = {k: v for k, v in record[field_name].items() if str(k) != key}
        batch: RecordsIn = handler({**data, "records": records})
        batch._rejected = [
            RejectedItem(step=batch.records[i].step, field=field_name, key=key, reason="; ".join(msgs))
            for (i, field_name, key), msgs in reasons.items()
        ]
        return batch


class RecordsOut(BaseModel):
    accepted: int = Field(description="items newly stored (one per scalar, histogram, outlier list)")
    duplicates: int = Field(description="items already stored earlier (retried or overlapping batch)")
    rejected: list[RejectedItem] = Field(
        default_factory=list, description="items refused one by one; the rest of their record is stored"
    )


class RewindIn(_In):
    step: Annotated[int, Field(ge=-1, le=MAX_STEP, description="last step kept; -1 empties the history")]


class RewindOut(BaseModel):
    run_id: str
    step: int
    removed: dict[str, int] = Field(description="rows taken out per table: scalars, histograms, outliers, flags, alerts")


class ForkIn(_In):
    step: Step = Field(description="last step of the parent's history the new run starts with")
    name: Name | None = Field(None, description="the new run's name (default: '<parent name>-fork-<step>')")


class RunCreate(_In):
    project: Name
    name: Name
    config: dict[str, Any] | None = None
    loss: Name | None = None
    run_id: uuid.UUID | None = Field(None, description="client-chosen id (so a run exists before the server is reachable)")


class RunPatch(_In):
    status: RunStatus


class Run(BaseModel):
    run_id: str
    project: str
    name: str
    loss: str | None
    config: dict[str, Any] | None
    status: str
    created_at: float
    updated_at: float
    last_step: int | None
    last_seen_at: float | None
    open_flags: int
    parent_run_id: str | None = None
    fork_step: int | None = None


class RunList(BaseModel):
    runs: list[Run]


class Project(BaseModel):
    name: str
    runs: int
    created_at: float


class ProjectList(BaseModel):
    projects: list[Project]


class Keys(BaseModel):
    scalars: list[str]
    histograms: list[str]


class Series(BaseModel):
    step: list[int]
    value: list[float]
    min: list[float]
    max: list[float]


class ScalarsOut(BaseModel):
    run_id: str
    downsampled: bool
    series: dict[str, Series]


class HistogramsOut(BaseModel):
    key: str
    lo: float | None
    hi: float | None
    bins: int | None
    step: list[int]
    step_end: list[int]
    counts: list[list[int]]
    underflow: list[int]
    overflow: list[int]
    min: list[float]
    max: list[float]
    sum: list[float]
    sumsq: list[float]


class OutliersOut(BaseModel):
    step: int | None
    outliers: list[dict[str, Any]]


class EventCreate(_In):
    """A flag raised by a detector; unique per (run, kind, detector, step)."""

    step: Step
    kind: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    severity: Severity
    detector: Name
    message: str = ""
    evidence: dict[str, Any] | None = None
    created_at: float | None = None


class Event(BaseModel):
    """A stored flag; other event sources (fired alerts) add items with their own "type" and fields."""

    model_config = ConfigDict(extra="allow")

    id: int
    type: str = "flag"
    kind: str
    step: int
    severity: str
    detector: str
    message: str
    evidence: dict[str, Any] | None
    created_at: float


class EventList(BaseModel):
    events: list[Event]


class TokenInfo(BaseModel):
    id: int
    project: str
    scope: Scope


MAX_QUERY_KEYS = 1_000


def parse_keys(raw: str | None) -> list[str]:
    """`keys=a,b` -> ["a", "b"] (empty entries dropped, order kept, duplicates removed).

    Raises ValueError for more than MAX_QUERY_KEYS keys or a key that no record could carry.
    """
    if not raw:
        return []
    keys = list(dict.fromkeys(k for k in (part.strip() for part in raw.split(",")) if k))
    if len(keys) > MAX_QUERY_KEYS:
        raise ValueError(f"{len(keys)} keys exceed the limit of {MAX_QUERY_KEYS} per request; ask in several requests")
    for key in keys:
        if len(key) > 250 or not re.match(KEY_PATTERN, key):
            raise ValueError(f"key {key[:40]!r} is not a valid key (1-250 characters, no control characters)")
    return keys


