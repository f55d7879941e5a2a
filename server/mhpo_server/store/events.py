"""Events (flags, rewinds, forks), an evaluation's commit (its flags, fired alerts and the run's
evaluation position in one transaction), and the reads the flag evaluator needs:
scalar windows, the last flagged steps, the steps and keys to catch up on. The evaluator's reads
run in plain transactions (`Database.plain_tx`): it reports its own failures."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, func, literal, or_, select, text, union_all, update

from mhpo_server.schemas import Event, EventCreate
from mhpo_server.store.engine import Database, Part
from mhpo_server.store.models import AlertRow, EventRow, RunRow, ScalarRow
from mhpo_server.store.runs import Runs

HISTORY_KINDS = ("rewind", "fork")  # events about the run's history, not flags: kept by a rewind, not copied by a fork
WINDOW_CHUNK = 100  # keys per UNION ALL statement: 2 selects per key, SQLite allows 500 per compound select
ALERT_DEFAULTS = {"acknowledged_at": None, "delivery_attempts": 0, "delivery_error": None, "delivered_at": None}


class Events(Part):
    def __init__(self, db: Database, runs: Runs) -> None:
        super().__init__(db)
        self.runs = runs
        self._add_flags = self._insert(EventRow.__table__).on_conflict_do_nothing(
            index_elements=["run_id", "kind", "detector", "step"]
        )
        self._add_alert = (
            self._insert(AlertRow.__table__)
            .on_conflict_do_nothing(
                index_elements=["rule_id", "run_id", "step"], index_where=text("rewound_at IS NULL")
            )
            .returning(AlertRow.id)
        )

    def add_events(self, run_id: str, events: Sequence[EventCreate | Mapping[str, Any]]) -> int:
        now = time.time()
        parsed = [e if isinstance(e, EventCreate) else EventCreate.model_validate(e) for e in events]
        if not parsed:
            return 0
        rows = [_event_row(run_id, e, now) for e in parsed]
        stmt = (
            self._insert(EventRow.__table__)
            .on_conflict_do_nothing(index_elements=["run_id", "kind", "detector", "step"])
            .returning(EventRow.id)
        )
        with self._tx(write=True) as conn:
            self.runs.require(conn, run_id)
            return len(conn.execute(stmt, rows).all())

    def commit_evaluation(
        self, run_id: str, through_step: int, events: Sequence[EventCreate], alerts: Sequence[Mapping[str, Any]]
    ) -> list[int | None]:
        with self._tx(write=True) as conn:
            fired = self.add_evaluation(conn, run_id, events, alerts, time.time())
            conn.execute(
                update(RunRow)
                .where(RunRow.run_id == run_id, func.coalesce(RunRow.evaluated_step, -1) < through_step)
                .values(evaluated_step=through_step)
            )
        return fired

    def add_evaluation(
        self,
        conn: Connection,
        run_id: str,
        events: Sequence[EventCreate],
        alerts: Sequence[Mapping[str, Any]],
        now: float,
    ) -> list[int | None]:
        """Insert flags and alerts (each ignored when stored before); returns the alerts' ids, None for those."""
        if events:
            conn.execute(self._add_flags, [_event_row(run_id, e, now) for e in events])
        fired: list[int | None] = []
        for alert in alerts:  # one statement each: RETURNING says which were new
            found = conn.execute(self._add_alert, {**ALERT_DEFAULTS, **alert}).first()
            fired.append(None if found is None else int(found[0]))
        return fired

    def list_events(self, run_id: str, after_id: int | None = None, since: float | None = None) -> list[Event]:
        query = (
            select(
                EventRow.id,
                EventRow.kind,
                EventRow.step,
                EventRow.severity,
                EventRow.detector,
                EventRow.message,
                EventRow.evidence,
                EventRow.created_at,
            )
            .where(EventRow.run_id == run_id)
            .order_by(EventRow.step, EventRow.id)
        )
        if after_id is not None:
            wanted = [
                EventRow.id > after_id,
                EventRow.kind == "rewind",
                *([EventRow.created_at >= since] if since else []),
            ]
            query = query.where(or_(*wanted))
        with self._tx() as conn:
            self.runs.require(conn, run_id)
            return [
                Event(**row._mapping, type=row.kind if row.kind in HISTORY_KINDS else "flag")
                for row in conn.execute(query)
            ]

    def scalar_windows(
        self, run_id: str, keys: Sequence[str], first: int, last: int, points: int
    ) -> tuple[list[tuple[str, int, float]], dict[str, int]]:
        """Per key: the last `points` points before step `first` and every point in [first, last].

        Also returns each key's latest stored step (keys never logged are absent), so the
        caller knows whether these rows are the key's newest. One index seek per key and
        window: the cost does not grow with the length of the run.
        """
        cols = (ScalarRow.key, ScalarRow.step, ScalarRow.value, ScalarRow.is_nan)
        rows: list[tuple[str, int, float]] = []
        latest: dict[str, int] = {}
        keys = sorted(set(keys))
        with self.db.plain_tx() as conn:
            for i in range(0, len(keys), WINDOW_CHUNK):
                chunk = keys[i : i + WINDOW_CHUNK]
                parts = []
                for key in chunk:
                    of_key = (ScalarRow.run_id == run_id, ScalarRow.key == key)
                    before = (
                        select(literal(0).label("part"), *cols)
                        .where(*of_key, ScalarRow.step < first)
                        .order_by(ScalarRow.step.desc())
                        .limit(points)
                        .subquery()
                    )
                    top = (
                        select(literal(1).label("part"), *cols).where(*of_key).order_by(ScalarRow.step.desc()).limit(1)
                    )
                    parts += [select(before), select(top.subquery())]
                parts.append(
                    select(literal(0).label("part"), *cols).where(
                        ScalarRow.run_id == run_id,
                        ScalarRow.key.in_(chunk),
                        ScalarRow.step >= first,
                        ScalarRow.step <= last,
                    )
                )
                for part, k, s, v, n in conn.execute(union_all(*parts)):
                    if part:
                        latest[k] = int(s)
                    else:
                        rows.append((k, int(s), float("nan") if n or v is None else float(v)))
        return rows, latest

    def scalar_heads(self, run_id: str, keys: Sequence[str], points: int) -> list[tuple[str, int, float]]:
        """Per key: its first `points` points (key, step, value); one index seek per key."""
        cols = (ScalarRow.key, ScalarRow.step, ScalarRow.value, ScalarRow.is_nan)
        rows: list[tuple[str, int, float]] = []
        keys = sorted(set(keys))
        with self.db.plain_tx() as conn:
            for i in range(0, len(keys), WINDOW_CHUNK):
                parts = [
                    select(
                        select(*cols)
                        .where(ScalarRow.run_id == run_id, ScalarRow.key == key)
                        .order_by(ScalarRow.step)
                        .limit(points)
                        .subquery()
                    )
                    for key in keys[i : i + WINDOW_CHUNK]
                ]
                for k, s, v, n in conn.execute(union_all(*parts)):
                    rows.append((k, int(s), float("nan") if n or v is None else float(v)))
        return rows

    def scalar_keys_between(self, run_id: str, first: int, last: int) -> list[str]:
        """The keys with a point in steps [first, last]."""
        query = (
            select(ScalarRow.key)
            .where(ScalarRow.run_id == run_id, ScalarRow.step >= first, ScalarRow.step <= last)
            .distinct()
        )
        with self.db.plain_tx() as conn:
            return list(conn.execute(query).scalars())

    def scalar_steps_between(self, run_id: str, after: int | None, last: int, limit: int) -> list[int]:
        """The first `limit` steps with a stored scalar in (after, last], ascending."""
        query = select(ScalarRow.step).where(ScalarRow.run_id == run_id, ScalarRow.step <= last)
        if after is not None:
            query = query.where(ScalarRow.step > after)
        query = query.distinct().order_by(ScalarRow.step).limit(limit)
        with self.db.plain_tx() as conn:
            return [int(step) for step in conn.execute(query).scalars()]

    def last_flag_steps(self, run_id: str, kinds: Sequence[str], before_step: int) -> dict[tuple[str, str], int]:
        """(kind, severity) -> the latest flagged step below `before_step` (for the refractory period)."""
        query = (
            select(EventRow.kind, EventRow.severity, func.max(EventRow.step))
            .where(EventRow.run_id == run_id, EventRow.kind.in_(list(kinds)), EventRow.step < before_step)
            .group_by(EventRow.kind, EventRow.severity)
        )
        with self.db.plain_tx() as conn:
            return {(kind, severity): int(step) for kind, severity, step in conn.execute(query)}


def _event_row(run_id: str, event: EventCreate, now: float) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "step": event.step,
        "kind": event.kind,
        "severity": event.severity,
        "detector": event.detector,
        "message": event.message,
        "evidence": event.evidence,
        "created_at": now if event.created_at is None else event.created_at,
    }
