"""The store interface the routes call; `mhpo_server.store.sql.SqlStore` implements it on SQLAlchemy.

Only the store names tables: callers get pydantic models or plain tuples.

Errors the routes turn into HTTP answers:
    StoreError
    ├── NotFound       -> 404 (unknown run)
    ├── Conflict       -> 409 (run id taken by another run, histogram binning changed)
    ├── Invalid        -> 422 (input the schema cannot catch, naming the field)
    ├── OverLimit      -> 422 (a read over a server limit, naming the limit and the fix)
    ├── Unavailable    -> 503 + Retry-After (busy, read-only or unreachable database, I/O error)
    │   └── StorageFull -> 507 + Retry-After (the disk holding the database is full)
    └── SchemaError    -> the server refuses to start; the message says which command fixes it
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mhpo_server.schemas import (
    Event,
    EventCreate,
    HistogramsOut,
    Keys,
    OutliersOut,
    Project,
    RecordIn,
    RejectedItem,
    RewindOut,
    Run,
    RunCreate,
    ScalarsOut,
    TokenInfo,
)

if TYPE_CHECKING:
    from mhpo_server.store.alerts import AlertStore


class StoreError(Exception):
    """Base of the store's errors."""


class NotFound(StoreError, LookupError):
    @classmethod
    def run(cls, run_id: str) -> NotFound:
        """The one answer for a run the caller cannot see: unknown, or another project's (no existence leak)."""
        return cls(f"run_id {run_id!r} does not exist: create it with POST /api/v1/runs")


class Conflict(StoreError):
    pass


class Invalid(StoreError, ValueError):
    """`loc` is the path of the offending field, as in a pydantic error: ("records", 0, "histograms", "x")."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {message}")
        self.loc = loc
        self.message = message


class OverLimit(StoreError):
    """A read larger than a server limit (422): `message` names the limit, its setting and the fix."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class SchemaError(StoreError, RuntimeError):
    pass


DATA_ERROR = "a value in the request cannot be stored or compared by the database (e.g. a NUL character): remove it"
PUBLIC_FAULTS = {
    "busy": "the database is busy",
    "read_only": "the database is read-only; the operator has been told (server log)",
    "disk_full": "the disk holding the database is full; the operator has been told (server log)",
    "unreachable": "the database is unreachable",
    "storage_error": "the database cannot be used right now",
}


class Unavailable(StoreError):
    """A storage fault the caller cannot fix but may retry: `reason` is a short slug, `retry_after` seconds.

    The message may hold the driver's text (host, port, database name): it is for the
    server log; callers get `public_message`.
    """

    def __init__(self, message: str, reason: str, retry_after: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after

    @property
    def public_message(self) -> str:
        """What any caller may read: the kind of fault and when to retry, nothing of the database's identity."""
        what = PUBLIC_FAULTS.get(self.reason, PUBLIC_FAULTS["storage_error"])
        return f"{what}: retry after {self.retry_after} s"


class Stale(StoreError):
    """A batch judged before its write met a run changed since (or steps it already has): nothing was written."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} changed since its batch was judged")


class StorageFull(Unavailable):
    pass


class WriteHealth:
    """The outcome of the latest write transaction, for `/healthz` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_ok_at: float | None = None
        self.last_failure: dict[str, object] | None = None

    @property
    def failing(self) -> bool:
        return self.last_failure is not None

    def ok(self) -> None:
        with self._lock:
            self.last_ok_at = time.time()
            self.last_failure = None

    def failed(self, error: Unavailable) -> None:
        with self._lock:
            self.last_failure = {"reason": error.reason, "message": str(error), "at": time.time()}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"ok": self.last_failure is None, "last_ok_at": self.last_ok_at, "last_failure": self.last_failure}


@dataclass
class WriteResult:
    """What one records batch did: counts for the client, the new records for ingest listeners."""

    accepted: int
    duplicates: int
    new_records: list[RecordIn] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    rejected: list[RejectedItem] = field(default_factory=list)
    last_step: int | None = None  # the run's last step after the batch
    # The run's evaluation position after the batch: steps after it are stored but not yet evaluated.
    evaluated_step: int | None = None
    # No stored step after `evaluated_step` but this batch's new ones: evaluating the batch alone is exact.
    caught_up: bool = True
    write_seq: int = 0  # the run's count of history changes after the batch
    alert_ids: list[int | None] = field(default_factory=list)  # of the prejudged alerts; None: stored before


@dataclass
class Prejudged:
    """A batch's flags and alerts judged before its write, from a server process's cached view of the run.

    The store keeps them, with the evaluation position, in the batch's own transaction when the
    run is as that view saw it (`write_seq` unchanged, evaluated through its last step) and every
    step of the batch is new; then a batch costs one transaction and needs no cross-process turn
    (the transaction itself checks the view). Otherwise it raises `Stale` and writes nothing.
    """

    write_seq: int
    events: list[EventCreate] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)


class Store(abc.ABC):
    write_health: WriteHealth
    alerts: AlertStore  # alert rules, fired alerts, detector overrides

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise Unavailable unless the database answers a trivial query."""

    @abc.abstractmethod
    def check_schema(self) -> None:
        """Raise SchemaError unless the database is at the migrations' head revision."""

    @abc.abstractmethod
    def create_run(self, run: RunCreate) -> Run: ...

    @abc.abstractmethod
    def update_run(self, run_id: str, status: str) -> Run: ...

    @abc.abstractmethod
    def merge_config(self, run_id: str, values: Mapping[str, Any], max_bytes: int | None = None) -> Run:
        """Add `values` to the run's config in one transaction that holds the run (MLflow params and tags).

        A key given again is overwritten, except that a dict merges into the dict stored under
        its key (tags under "mlflow.tags"); so concurrent calls each keep their keys. OverLimit
        when the merged config's JSON would exceed `max_bytes`.
        """

    @abc.abstractmethod
    def get_run(self, run_id: str) -> Run: ...

    @abc.abstractmethod
    def list_runs(self, project: str | None = None) -> list[Run]: ...

    @abc.abstractmethod
    def list_projects(self) -> list[Project]: ...

    @abc.abstractmethod
    def write_records(
        self,
        run_id: str,
        batch_id: str,
        records: Sequence[RecordIn],
        rejected: Sequence[RejectedItem] = (),
        prejudged: Prejudged | None = None,
    ) -> WriteResult:
        """One transaction, idempotent by (run, batch_id) and by (run, key, step).

        `rejected`: items the schema already refused (`RecordsIn.rejected_items`); they and
        the histograms whose binning differs from the run's are listed in `WriteResult.rejected`.
        """

    @abc.abstractmethod
    def rewind(self, run_id: str, step: int) -> RewindOut:
        """End the run's history at `step`: later data and flags deleted, later alerts marked rewound.

        Batch ids stay remembered, so a batch sent before the rewind stores nothing when re-sent.
        Idempotent: a rewind that finds nothing after `step` changes nothing and adds no event.
        """

    @abc.abstractmethod
    def fork(self, run_id: str, step: int, name: str | None) -> Run:
        """A new run in the parent's project holding a copy of the parent's history up to `step`."""

    @abc.abstractmethod
    def list_keys(self, run_id: str) -> Keys: ...

    @abc.abstractmethod
    def latest_scalars(self, run_id: str, max_keys: int) -> tuple[list[tuple[str, int, float, float]], bool]:
        """(key, step, value, time) of the first `max_keys` scalar keys (in key order) at their largest step,
        and whether the run has more keys than that."""

    @abc.abstractmethod
    def scalar_keys(self, run_id: str, limit: int) -> list[str]:
        """The run's first `limit` scalar keys in key order (a bounded `list_keys`)."""

    @abc.abstractmethod
    def get_scalars(
        self, run_id: str, keys: Sequence[str], start: int | None, end: int | None, max_points: int
    ) -> ScalarsOut: ...

    @abc.abstractmethod
    def scalar_history(
        self, run_id: str, key: str, from_step: int = 0, limit: int | None = None
    ) -> list[tuple[int, float, float]]:
        """(step, value, time) of one key from `from_step` on, by step, at most `limit` (MLflow's metric history)."""

    @abc.abstractmethod
    def get_histograms(
        self, run_id: str, key: str, start: int | None, end: int | None, max_steps: int, max_cells: int | None = None
    ) -> HistogramsOut:
        """Merged columns; OverLimit when the stored rows in range x bins exceed `max_cells`."""

    @abc.abstractmethod
    def get_outliers(self, run_id: str, step: int | None) -> OutliersOut: ...

    @abc.abstractmethod
    def add_events(self, run_id: str, events: Sequence[EventCreate | Mapping[str, Any]]) -> int:
        """Insert flags, ignoring ones already stored for (run, kind, detector, step); returns how many were new."""

    @abc.abstractmethod
    def list_events(self, run_id: str, after_id: int | None = None, since: float | None = None) -> list[Event]:
        """Every event of the run. With `after_id`, an incremental read: those with a larger id, those created at
        or after `since` (catching a row committed after a larger id), and every rewind (a rewind deletes
        flags, and SQLite may give their ids again, so a reader counts rewinds to know when to read it all)."""

    @abc.abstractmethod
    def scalar_windows(
        self, run_id: str, keys: Sequence[str], first: int, last: int, points: int
    ) -> tuple[list[tuple[str, int, float]], dict[str, int]]:
        """Per key: the last `points` points before step `first` and every point in [first, last]
        (key, step, value); and each key's latest stored step (keys never logged are absent)."""

    @abc.abstractmethod
    def scalar_heads(self, run_id: str, keys: Sequence[str], points: int) -> list[tuple[str, int, float]]:
        """Per key: its first `points` points (key, step, value), the run's early level that the state
        detectors compare with."""

    @abc.abstractmethod
    def last_flag_steps(self, run_id: str, kinds: Sequence[str], before_step: int) -> dict[tuple[str, str], int]:
        """(kind, severity) -> the latest flagged step below `before_step` (for the refractory period)."""

    @abc.abstractmethod
    def scalar_keys_between(self, run_id: str, first: int, last: int) -> list[str]:
        """The keys with a point in steps [first, last]."""

    @abc.abstractmethod
    def scalar_steps_between(self, run_id: str, after: int | None, last: int, limit: int) -> list[int]:
        """The first `limit` steps with a stored scalar in (after, last], ascending."""

    @abc.abstractmethod
    def commit_evaluation(
        self, run_id: str, through_step: int, events: Sequence[EventCreate], alerts: Sequence[Mapping[str, Any]]
    ) -> list[int | None]:
        """Store a batch's flags and fired alerts and move the run's evaluation position to
        `through_step`, in one transaction; returns each alert's id, None where it was stored before."""

    @abc.abstractmethod
    def evaluation_position(self, run_id: str) -> tuple[int | None, int | None]:
        """(evaluated step, last step) of the run."""

    @abc.abstractmethod
    def behind(self, limit: int = 1000) -> list[tuple[str, int | None, int]]:
        """Runs whose stored steps are ahead of their evaluation: (run id, evaluated step, last step)."""

    @abc.abstractmethod
    def create_token(self, project: str, scope: str) -> str:
        """A new secret token; only its SHA-256 is stored, so it is shown once."""

    @abc.abstractmethod
    def resolve_token(self, token: str) -> TokenInfo | None: ...

    @abc.abstractmethod
    def revoke_token(self, token: str) -> bool:
        """Delete the token (it stops working on the next request); False if it was not known."""

    @abc.abstractmethod
    def list_tokens(self) -> list[dict[str, Any]]:
        """Every token's id, project, scope, created_at and the first 8 hex digits of its SHA-256
        (`fingerprint`), oldest first; the tokens themselves are not stored."""

    @abc.abstractmethod
    def revoke_token_id(self, token_id: int) -> bool:
        """`revoke_token` by the id `list_tokens` shows; False if no token has it."""

    def run_turn(self, run_id: str) -> AbstractContextManager[None]:
        """Hold `run_id` against every other server process until the block ends.

        A batch's write and the ingest listeners that judge it take the run's turn, so two
        processes (replicas, `mhpo serve --workers N`) never evaluate one run's batches at
        once and flag it as one process would. A store only one process can use needs no
        lock across processes (this default).
        """
        return nullcontext()

    @abc.abstractmethod
    def close(self) -> None: ...
