"""Pydantic v2 models at the edge of the API (contracts C1 and C7 in docs/contracts.md).

The store returns these too (never ORM rows). Timestamps are unix seconds (float), the
same unit as a record's `time`. Non-finite floats are read as the strings "NaN",
"Infinity", "-Infinity" (protobuf's JSON, as MLflow and clients in other languages send
them) or as the bare tokens Python's json module writes; answers carry the strings
(`responses.NaNJSONResponse`), so every answer is strict JSON.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    model_validator,
)

MAX_STEP = 2**53
MAX_BINS = 10_000
MAX_KEYS_PER_RECORD = 10_000
MAX_OUTLIERS_PER_RECORD = 1_000
MAX_CONFIG_DEPTH = 32
# For the OpenAPI schema and pydantic (whose regex engine already refuses lone surrogates
# when it reads the string); KEY_RE is the same rule for Python's `re`, surrogates spelled out.
KEY_PATTERN = r"^[^\x00-\x1f\x7f]+$"
KEY_RE = re.compile(r"^[^\x00-\x1f\x7f\ud800-\udfff]+$")
SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
REDACTED = "[redacted]"
UNICODE_MSG = (
    "contains a lone surrogate, which is not valid Unicode text: send valid UTF-8 (decode bytes with errors='replace')"
)
# Words of a config key that mark its value as a secret (`hf_token`, `apiKey`, `db-password`).
SECRET_WORDS = frozenset({"token", "password", "passwd", "secret", "apikey", "credential", "credentials"})
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("webhook", "url")})


def unstorable(value: str) -> str | None:
    """Why `value` cannot be stored and shown as UTF-8 text, or None when it can.

    A lone surrogate (what `os.fsdecode` makes of a non-UTF-8 file name, or JSON "\\ud800")
    has no UTF-8 encoding; PostgreSQL text cannot hold a NUL character.
    """
    found = SURROGATE_RE.search(value)
    if found is not None:
        return (
            f"contains a lone surrogate {found.group()!a} at index {found.start()}, which is not valid Unicode "
            "text: send valid UTF-8 (decode bytes with errors='replace')"
        )
    if "\x00" in value:
        return f"contains a NUL character at index {value.index(chr(0))}, which cannot be stored: remove it"
    return None


def invalid_key(key: str) -> str | None:
    """Why `key` cannot name a scalar or histogram, or None when it can (1-250 characters, no control characters)."""
    if not 1 <= len(key) <= 250:
        return f"key {key[:40]!a} must be 1-250 characters long (got {len(key)})"
    if not KEY_RE.match(key):
        return f"key {key[:40]!a} holds a control character or a lone surrogate: use printable Unicode text"
    return None


def _integral(value: Any) -> Any:
    """A float with no fractional part (2.0) is an integer, as JSON Schema says; "2" and true stay errors."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _storable(value: str) -> str:
    reason = unstorable(value)
    if reason is not None:
        raise ValueError(reason)
    return value


def _is_secret(key: str) -> bool:
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()
    parts = [w for w in re.split(r"[^a-z0-9]+", words) if w]
    return any(p in SECRET_WORDS for p in parts) or any(pair in SECRET_PAIRS for pair in itertools.pairwise(parts))


def clean_config(value: Any, path: tuple[str | int, ...] = ()) -> Any:
    """The config with every key and string checked (ValueError naming the path) and secrets redacted.

    A key named like a secret (token, password, secret, api_key, ...) keeps its name but its
    value becomes "[redacted]" (None and booleans are kept: they are no secret), so a run's
    config never hands a credential to its readers.
    """
    where = "config" + "".join(f"[{p!a}]" for p in path)
    if len(path) > MAX_CONFIG_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels; flatten the config")
    if isinstance(value, str):
        reason = unstorable(value)
        if reason is not None:
            raise ValueError(f"{where}: {reason}")
        return value
    if isinstance(value, list):
        return [clean_config(item, (*path, i)) for i, item in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            reason = unstorable(key)
            if reason is not None:
                raise ValueError(f"{where}: key {key[:40]!a} {reason}")
            secret = _is_secret(key) and item is not None and not isinstance(item, bool)
            out[key] = REDACTED if secret else clean_config(item, (*path, key))
        return out
    return value


def _largest_string(value: Any, path: tuple[str | int, ...] = ()) -> tuple[int, tuple[str | int, ...]]:
    """(UTF-8 bytes, path) of the longest string in a config, keys included."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")), path
    best: tuple[int, tuple[str | int, ...]] = (0, path)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str):
            best = max(best, (len(key.encode("utf-8", "surrogatepass")), (*path, key)), key=lambda b: b[0])
        best = max(best, _largest_string(item, (*path, key)), key=lambda b: b[0])
    return best


def config_too_large(config: Any, max_value_bytes: int, max_bytes: int | None = None) -> str | None:
    """Why `config` is over the config limits (a string over MHPO_MAX_CONFIG_VALUE_BYTES, the whole over
    MHPO_MAX_CONFIG_BYTES), or None: every run listing carries each run's config, so its size is bounded."""
    size, path = _largest_string(config)
    if size > max_value_bytes:
        where = "config" + "".join(f"[{str(p)[:40]!a}]" for p in path)
        return (
            f"{where} has {size} bytes, more than the limit of {max_value_bytes} per value "
            "(MHPO_MAX_CONFIG_VALUE_BYTES): log large values as artifacts or files, not in the config"
        )
    if max_bytes is not None:
        total = len(json.dumps(config, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass"))
        if total > max_bytes:
            return (
                f"the config has {total} bytes of JSON, more than the limit of {max_bytes} per run "
                "(MHPO_MAX_CONFIG_BYTES): keep only the settings worth comparing runs by"
            )
    return None


Text = Annotated[str, AfterValidator(_storable)]
Key = Annotated[str, StringConstraints(min_length=1, max_length=250, pattern=KEY_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=KEY_PATTERN), AfterValidator(_storable)]
Config = Annotated[dict[str, Any], AfterValidator(clean_config)]
Integral = BeforeValidator(
    _integral
)  # after the bounds in Annotated[int, Field(...), Integral], so the schema keeps them
Step = Annotated[int, Field(ge=0, le=MAX_STEP), Integral]
Count = Annotated[int, Field(ge=0, le=2**62), Integral]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
NON_FINITE = ("NaN", "Infinity", "-Infinity")  # protobuf JSON's (MLflow's, other languages') spelling
# A float of a record that may also be written "NaN", "Infinity" or "-Infinity" (JSON has no token
# for them; the bare tokens Python writes are read too). Validation stays one strict pass in Rust:
# `RecordsIn` turns these strings into floats only when a batch holds some (see `_non_finite_strings`).
Number = Annotated[float, WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string", "enum": list(NON_FINITE)}]})]
RunStatus = Literal["running", "finished", "failed", "crashed"]
Severity = Literal["info", "warning", "critical"]
Scope = Literal["write", "read"]


class InputModel(BaseModel):
    """A request body: unknown fields and loose types are refused with a 422 naming the field.

    Strict: a step given as "1" or true, or a scalar given as true, is an error, not a
    silent conversion (an int is still a valid float).
    """

    model_config = ConfigDict(extra="forbid", strict=True)


class _In(BaseModel):
    """Inputs the server builds itself (flags): unknown fields refused, numpy numbers converted."""

    model_config = ConfigDict(extra="forbid")


class HistogramIn(InputModel):
    lo: FiniteFloat
    hi: FiniteFloat
    counts: Annotated[list[Count], Field(min_length=1, max_length=MAX_BINS)]
    underflow: Count = 0
    overflow: Count = 0
    min: Number = math.nan
    max: Number = math.nan
    sum: Number = 0.0
    sumsq: Number = 0.0

    @model_validator(mode="after")
    def _bounds(self) -> HistogramIn:
        if not self.lo < self.hi:
            raise ValueError(f"lo must be < hi (got lo={self.lo}, hi={self.hi})")
        return self


class OutlierIn(InputModel):
    sample: Annotated[int, Field(ge=0, le=2**31), Integral]
    position: Annotated[int, Field(ge=0, le=2**31), Integral]
    token_id: Annotated[int, Field(ge=0, le=2**31), Integral] | None = None
    text: Annotated[Text, Field(max_length=1000)] = ""
    x: Number
    A: Number
    zeta: Number | None = None


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


def _spelled(key: str) -> str:
    """`key` as an error's loc names it: pydantic writes lone surrogates as U+FFFD, which keeps the
    loc (and the `rejected` answer) valid UTF-8."""
    if SURROGATE_RE.search(key) is None:
        return key
    return key.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _non_finite_strings(data: Any, errors: list[Any]) -> Any:
    """`data` with each "NaN" / "Infinity" / "-Infinity" string a float error points at replaced by
    the float, or None when no error is one of those (the batch is then judged as it is)."""
    spots = [
        tuple(e["loc"])
        for e in errors
        if e["type"] == "float_type" and e.get("input") in NON_FINITE and e["loc"][:1] == ("records",)
    ]
    if not spots:
        return None
    if isinstance(data, str | bytes):  # model_validate_json: the strings are in the JSON text
        data = json.loads(data)
    if not isinstance(data, dict):
        return None
    records = list(data["records"])
    for loc in spots:
        node = records[loc[1]] = _copied(records[loc[1]])
        for part in loc[2:-1]:
            node[part] = _copied(node[part])
            node = node[part]
        node[loc[-1]] = float(node[loc[-1]])
    return {**data, "records": records}


def _copied(node: Any) -> Any:
    return list(node) if isinstance(node, list) else dict(node)


# pydantic states the key pattern as `patternProperties`, which alone lets other keys through in JSON Schema.
KEYS_ONLY: dict[str, Any] = {"additionalProperties": False}


class RecordIn(InputModel):
    step: Step
    time: Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)] | None = None
    # Factories, not `= {}`: pydantic deep-copies a mutable default for every record it builds.
    scalars: Annotated[dict[Key, Number], Field(max_length=MAX_KEYS_PER_RECORD, json_schema_extra=KEYS_ONLY)] = Field(
        default_factory=dict
    )
    histograms: Annotated[dict[Key, HistogramIn], Field(max_length=1_000, json_schema_extra=KEYS_ONLY)] = Field(
        default_factory=dict
    )
    outliers: Annotated[list[OutlierIn], Field(max_length=MAX_OUTLIERS_PER_RECORD)] = Field(default_factory=list)

    def items(self) -> int:
        """Stored items: one per scalar, one per histogram, one for the outlier list if any."""
        return len(self.scalars) + len(self.histograms) + (1 if self.outliers else 0)


class RecordsIn(InputModel):
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
            spelled = _non_finite_strings(data, errors)
            if spelled is not None:  # "NaN" / "Infinity" strings: validate again with them as floats
                try:
                    return handler(spelled)
                except ValidationError as again:
                    data, errors = spelled, again.errors()
            items = [_item_of(tuple(e["loc"])) for e in errors]
            if any(item is None for item in items) or not isinstance(data, dict):
                raise
        reasons: dict[tuple[int, ItemField, str | None], list[str]] = {}
        for item, error in zip(items, errors, strict=True):
            assert item is not None
            loc = error["loc"][3:] if item[1] == "outliers" else error["loc"][4:]
            where = ".".join("key" if part == "[key]" else str(part) for part in loc)
            msg = UNICODE_MSG if error["type"] == "string_unicode" else error["msg"]
            reasons.setdefault(item, []).append(f"{where}: {msg}" if where else msg)
        records = list(data["records"])
        for i, field_name, key in reasons:
            record = records[i] = dict(records[i])
            if field_name == "outliers":
                record["outliers"] = []
            else:
                named = [k for k in record[field_name] if _spelled(str(k)) == key]
                if len(named) > 1:  # a valid key spelled with U+FFFD and one with lone surrogates: the latter
                    named = [k for k in named if invalid_key(str(k)) is not None]
                record[field_name] = {k: v for k, v in record[field_name].items() if k not in named}
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


class RewindIn(InputModel):
    step: Annotated[int, Field(ge=-1, le=MAX_STEP, description="last step kept; -1 empties the history"), Integral]


class RewindOut(BaseModel):
    run_id: str
    step: int
    removed: dict[str, int] = Field(
        description="rows taken out per table: scalars, histograms, outliers, flags, alerts"
    )


class ForkIn(InputModel):
    step: Step = Field(description="last step of the parent's history the new run starts with")
    name: Name | None = Field(None, description="the new run's name (default: '<parent name>-fork-<step>')")


class RunCreate(InputModel):
    project: Name
    name: Name
    config: Config | None = Field(
        None,
        description='any JSON object; values of keys named like token, password, secret or api_key are stored as "[redacted]"',
    )
    loss: Name | None = None
    run_id: Annotated[uuid.UUID, Strict(False)] | None = Field(
        None, description="client-chosen id (so a run exists before the server is reachable)"
    )


class RunPatch(InputModel):
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
    """Values may be NaN or +-Infinity, written "NaN", "Infinity", "-Infinity"."""

    step: list[int]
    value: list[Number]
    min: list[Number]
    max: list[Number]


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
    min: list[Number]
    max: list[Number]
    sum: list[Number]
    sumsq: list[Number]


class OutliersOut(BaseModel):
    step: int | None
    outliers: list[dict[str, Any]]


class EventCreate(_In):
    """A flag raised by a detector; unique per (run, kind, detector, step)."""

    step: Step
    kind: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    severity: Severity
    detector: Name
    message: Text = ""
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
    cursor: str | None = Field(
        None, description="only with `?after=`: pass it as `after` next time to get only newer events"
    )
    reset: bool | None = Field(
        None, description="only with `?after=`: the run was rewound since, so this is the whole list; replace yours"
    )


class ErrorOut(BaseModel):
    """Every refusal: `detail` is a message, or for 422 a list of {loc, msg, type} naming each bad field."""

    detail: Any


class FaultOut(ErrorOut):
    """A storage fault (503, 507): retry after `retry_after` seconds (also the Retry-After header)."""

    reason: str = Field(description="busy | read_only | disk_full | unreachable | storage_error")
    retry_after: int


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "the body is not JSON"},
    401: {"model": ErrorOut, "description": "auth is on and the token is missing or unknown"},
    403: {"model": ErrorOut, "description": "the token's scope or project does not allow this"},
    404: {"model": ErrorOut, "description": "no such run, rule or alert"},
    409: {"model": ErrorOut, "description": "the id is taken, or the data conflicts with what is stored"},
    413: {"model": ErrorOut, "description": "the body exceeds MHPO_MAX_BODY_BYTES"},
    503: {"model": FaultOut, "description": "storage busy, read-only or unreachable: retry after Retry-After seconds"},
    507: {"model": FaultOut, "description": "the disk holding the database is full: retry after Retry-After seconds"},
}


class TokenInfo(BaseModel):
    id: int
    project: str
    scope: Scope


def parse_keys(raw: str | None, exact: Sequence[str] = (), limit: int = 1_000) -> list[str]:
    """`keys=a,b` -> ["a", "b"], then each `key=` value as it is (a key may hold a comma); order kept,
    duplicates removed, empty entries of `keys=` dropped.

    Raises ValueError for more than `limit` keys (MHPO_MAX_KEYS_PER_READ) or a key that no record could carry.
    """
    split = (k for k in (part.strip() for part in (raw or "").split(",")) if k)
    keys = list(dict.fromkeys([*split, *exact]))
    if len(keys) > limit:
        raise ValueError(
            f"{len(keys)} keys exceed the limit of {limit} per read (MHPO_MAX_KEYS_PER_READ): ask in several requests"
        )
    for key in keys:
        reason = invalid_key(key)
        if reason is not None:
            raise ValueError(reason)
    return keys
