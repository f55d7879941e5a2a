"""The SQL store: SQLite (default) or PostgreSQL (psycopg 3) through SQLAlchemy 2 Core.

`SqlStore` is the `Store` the routes call; it holds one `Database` (engine, transactions,
run turns: `engine.py`) and one part per aggregate, each owning its tables: runs and
projects (`runs.py`), record writes, rewind and fork (`records.py`), series reads
(`series.py`), events and the flag evaluator's reads (`events.py`), alerts and rules
(`alerts.py`, reached as `store.alerts`), tokens (`tokens.py`). Nothing outside this
package names a table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Engine

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
from mhpo_server.store.alerts import AlertStore
from mhpo_server.store.base import Prejudged, Store, WriteResult
from mhpo_server.store.engine import Database, make_engine
from mhpo_server.store.events import Events
from mhpo_server.store.records import Records
from mhpo_server.store.runs import Runs
from mhpo_server.store.series import SeriesReads
from mhpo_server.store.tokens import Tokens


class SqlStore(Store):
    def __init__(self, engine: Engine) -> None:
        self.db = Database(engine)
        self.engine = engine
        self.write_health = self.db.write_health
        self.runs = Runs(self.db)
        self.events = Events(self.db, self.runs)
        self.records = Records(self.db, self.runs, self.events)
        self.series = SeriesReads(self.db, self.runs)
        self.tokens = Tokens(self.db)
        self.alerts = AlertStore(self.db)

    @classmethod
    def from_url(cls, url: str, busy_timeout_ms: int = 30_000, pool_size: int = 10) -> SqlStore:
        return cls(make_engine(url, busy_timeout_ms, pool_size))

    def close(self) -> None:
        self.db.close()

    def run_turn(self, run_id: str) -> AbstractContextManager[None]:
        return self.db.run_turn(run_id)

    def ping(self) -> None:
        self.db.ping()

    def check_schema(self) -> None:
        self.db.check_schema()

    def create_run(self, run: RunCreate) -> Run:
        return self.runs.create_run(run)

    def update_run(self, run_id: str, status: str) -> Run:
        return self.runs.update_run(run_id, status)

    def merge_config(self, run_id: str, values: Mapping[str, Any], max_bytes: int | None = None) -> Run:
        return self.runs.merge_config(run_id, values, max_bytes)

    def get_run(self, run_id: str) -> Run:
        return self.runs.get_run(run_id)

    def list_runs(self, project: str | None = None) -> list[Run]:
        return self.runs.list_runs(project)

    def list_projects(self) -> list[Project]:
        return self.runs.list_projects()

    def write_records(
        self,
        run_id: str,
        batch_id: str,
        records: Sequence[RecordIn],
        rejected: Sequence[RejectedItem] = (),
        prejudged: Prejudged | None = None,
    ) -> WriteResult:
        return self.records.write_records(run_id, batch_id, records, rejected, prejudged)

    def rewind(self, run_id: str, step: int) -> RewindOut:
        return self.records.rewind(run_id, step)

    def fork(self, run_id: str, step: int, name: str | None) -> Run:
        return self.records.fork(run_id, step, name)

    def list_keys(self, run_id: str) -> Keys:
        return self.series.list_keys(run_id)

    def latest_scalars(self, run_id: str, max_keys: int) -> tuple[list[tuple[str, int, float, float]], bool]:
        return self.series.latest_scalars(run_id, max_keys)

    def scalar_keys(self, run_id: str, limit: int) -> list[str]:
        return self.series.scalar_keys(run_id, limit)

    def get_scalars(
        self, run_id: str, keys: Sequence[str], start: int | None, end: int | None, max_points: int
    ) -> ScalarsOut:
        return self.series.get_scalars(run_id, keys, start, end, max_points)

    def scalar_history(
        self, run_id: str, key: str, from_step: int = 0, limit: int | None = None
    ) -> list[tuple[int, float, float]]:
        return self.series.scalar_history(run_id, key, from_step, limit)

    def get_histograms(
        self, run_id: str, key: str, start: int | None, end: int | None, max_steps: int, max_cells: int | None = None
    ) -> HistogramsOut:
        return self.series.get_histograms(run_id, key, start, end, max_steps, max_cells)

    def get_outliers(self, run_id: str, step: int | None) -> OutliersOut:
        return self.series.get_outliers(run_id, step)

    def add_events(self, run_id: str, events: Sequence[EventCreate | Mapping[str, Any]]) -> int:
        return self.events.add_events(run_id, events)

    def list_events(self, run_id: str, after_id: int | None = None, since: float | None = None) -> list[Event]:
        return self.events.list_events(run_id, after_id, since)

    def commit_evaluation(
        self, run_id: str, through_step: int, events: Sequence[EventCreate], alerts: Sequence[Mapping[str, Any]]
    ) -> list[int | None]:
        return self.events.commit_evaluation(run_id, through_step, events, alerts)

    def evaluation_position(self, run_id: str) -> tuple[int | None, int | None]:
        return self.runs.evaluation_position(run_id)

    def behind(self, limit: int = 1000) -> list[tuple[str, int | None, int]]:
        return self.runs.behind(limit)

    def scalar_keys_between(self, run_id: str, first: int, last: int) -> list[str]:
        return self.events.scalar_keys_between(run_id, first, last)

    def scalar_steps_between(self, run_id: str, after: int | None, last: int, limit: int) -> list[int]:
        return self.events.scalar_steps_between(run_id, after, last, limit)

    def scalar_windows(
        self, run_id: str, keys: Sequence[str], first: int, last: int, points: int
    ) -> tuple[list[tuple[str, int, float]], dict[str, int]]:
        return self.events.scalar_windows(run_id, keys, first, last, points)

    def scalar_heads(self, run_id: str, keys: Sequence[str], points: int) -> list[tuple[str, int, float]]:
        return self.events.scalar_heads(run_id, keys, points)

    def last_flag_steps(self, run_id: str, kinds: Sequence[str], before_step: int) -> dict[tuple[str, str], int]:
        return self.events.last_flag_steps(run_id, kinds, before_step)

    def create_token(self, project: str, scope: str) -> str:
        return self.tokens.create_token(project, scope)

    def resolve_token(self, token: str) -> TokenInfo | None:
        return self.tokens.resolve_token(token)

    def revoke_token(self, token: str) -> bool:
        return self.tokens.revoke_token(token)

    def list_tokens(self) -> list[dict[str, Any]]:
        return self.tokens.list_tokens()

    def revoke_token_id(self, token_id: int) -> bool:
        return self.tokens.revoke_token_id(token_id)
