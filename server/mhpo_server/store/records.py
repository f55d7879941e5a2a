"""Record writes and history edits: a batch's scalars, histograms and outliers; rewind; fork.

A batch of new steps goes in with one bulk insert per table (executemany on SQLite, COPY
on PostgreSQL); a batch that reaches back to stored steps goes through `INSERT ... ON
CONFLICT DO NOTHING RETURNING` (dialect-specific), so a retried or overlapping batch
stores nothing twice and the store knows exactly which items were new.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection, delete, func, insert, literal, select, update
from sqlalchemy import column as sql_column
from sqlalchemy import table as sql_table

from mhpo_server.schemas import RecordIn, RejectedItem, RewindOut, Run
from mhpo_server.store import tiers
from mhpo_server.store.base import Invalid, Prejudged, Stale, WriteResult
from mhpo_server.store.engine import Database, Part, dumps
from mhpo_server.store.events import HISTORY_KINDS, Events
from mhpo_server.store.models import (
    COUNT_DTYPE,
    STAT_DTYPE,
    AlertRow,
    BatchRow,
    EventRow,
    HistogramRow,
    OutlierRow,
    RunRow,
    ScalarRow,
)
from mhpo_server.store.runs import Runs
from mhpo_server.store.series import SeriesReads

BULK_COLUMNS = {
    "scalars": ("run_id", "key", "step", "value", "is_nan", "time"),
    "histograms": ("run_id", "key", "step", "lo", "hi", "bins", "counts", "stats", "time"),
    "outliers": ("run_id", "step", "data", "time"),
    "scalar_tiers": tiers.AGG_FIELDS,
}


class Records(Part):
    def __init__(self, db: Database, runs: Runs, events: Events) -> None:
        super().__init__(db)
        self.runs = runs
        self.events = events
        self._tiers = tiers.TierUpkeep(lambda conn, rows: self._bulk_insert(conn, "scalar_tiers", rows))
        self._add_batch = (
            self._insert(BatchRow.__table__)
            .on_conflict_do_nothing(index_elements=["run_id", "batch_id"])
            .returning(BatchRow.batch_id)
        )

    def write_records(
        self,
        run_id: str,
        batch_id: str,
        records: Sequence[RecordIn],
        rejected: Sequence[RejectedItem] = (),
        prejudged: Prejudged | None = None,
    ) -> WriteResult:
        now = time.time()
        rejected = list(rejected)
        with self._tx(write=True) as conn:
            last_step, evaluated, write_seq = self.runs.lock(conn, run_id)
            caught_up = last_step is None or (evaluated is not None and evaluated >= last_step)
            position: dict[str, Any] = {"last_step": last_step, "evaluated_step": evaluated, "write_seq": write_seq}
            if prejudged is not None and not (
                records
                and prejudged.write_seq == write_seq
                and caught_up
                and (last_step is None or min(r.step for r in records) > last_step)
                and len({r.step for r in records}) == len(records)
            ):
                raise Stale(run_id)  # rolls back: nothing of the batch is written
            fresh_batch = conn.execute(
                self._add_batch,
                {"run_id": run_id, "batch_id": batch_id, "items": sum(r.items() for r in records), "created_at": now},
            ).first()
            if fresh_batch is None:
                if prejudged is not None:
                    raise Stale(run_id)
                return WriteResult(
                    accepted=0,
                    duplicates=sum(r.items() for r in records),
                    rejected=rejected,
                    caught_up=caught_up,
                    **position,
                )
            if not records:
                return WriteResult(accepted=0, duplicates=0, caught_up=caught_up, **position)
            records = self._check_binning(conn, run_id, records, rejected)
            total = sum(record.items() for record in records)
            scalar_rows, hist_rows, outlier_rows = _rows(run_id, records, now)
            steps = [r.step for r in records]
            first, top = min(steps), max(steps)
            all_new = (last_step is None or first > last_step) and len(set(steps)) == len(steps)
            if all_new:
                # Every step is new to the run and appears once in the batch, so nothing can
                # collide: a plain bulk insert (executemany, COPY) is exact and several times faster.
                for table, rows in (("scalars", scalar_rows), ("histograms", hist_rows), ("outliers", outlier_rows)):
                    self._bulk_insert(conn, table, rows)
                new_records = list(records)
                counts = {"scalars": len(scalar_rows), "histograms": len(hist_rows), "outliers": len(outlier_rows)}
                new_scalars, fresh = set(), scalar_rows
            else:
                new_scalars = self._insert_new(conn, "scalars", scalar_rows, ("key", "step"))
                new_hists = self._insert_new(conn, "histograms", hist_rows, ("key", "step"))
                new_outliers = self._insert_new(conn, "outliers", outlier_rows, ("step",))
                new_records = _only_new(records, new_scalars, new_hists, new_outliers)
                fresh = []
                counts = {"scalars": len(new_scalars), "histograms": len(new_hists), "outliers": len(new_outliers)}
            last = top if last_step is None else max(top, last_step)
            self._tiers.after_write(
                conn,
                run_id,
                (last_step, write_seq),
                last,
                new_scalars,
                lambda: SeriesReads.distinct_keys(conn, "scalars", run_id),
                fresh,
            )
            write_seq += 1
            values = {"rid": run_id, "last_step": last, "last_seen_at": now, "updated_at": now, "write_seq": write_seq}
            alert_ids: list[int | None] = []
            if prejudged is not None:
                alert_ids = self.events.add_evaluation(conn, run_id, prejudged.events, prejudged.alerts, now)
                evaluated = last
                conn.execute(self.runs.touch, {**values, "evaluated_step": evaluated})
            elif new_records and evaluated is not None and min(r.step for r in new_records) <= evaluated:
                # New steps at or before the evaluation position (an out-of-order batch): the steps
                # after them are judged again with them, so the position moves back before them.
                evaluated = min(r.step for r in new_records) - 1
                conn.execute(self.runs.touch, {**values, "evaluated_step": evaluated})
                caught_up = False
            else:
                conn.execute(self.runs.touch, values)
        accepted = sum(counts.values())
        return WriteResult(
            accepted=accepted,
            duplicates=total - accepted,
            new_records=new_records,
            rows=counts,
            rejected=rejected,
            last_step=last,
            evaluated_step=evaluated,
            caught_up=caught_up,
            write_seq=write_seq,
            alert_ids=alert_ids,
        )

    def _bulk_insert(self, conn: Connection, table: str, rows: list[tuple[Any, ...]]) -> None:
        """SQLite: the driver's executemany. PostgreSQL: COPY (only called when no row can collide)."""
        if not rows:
            return
        columns = ", ".join(BULK_COLUMNS[table])
        if self.dialect == "sqlite":
            marks = ", ".join("?" * len(BULK_COLUMNS[table]))
            conn.exec_driver_sql(f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING", rows)
            return
        with (
            conn.connection.driver_connection.cursor() as cursor,  # type: ignore[union-attr]
            cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)

    def _insert_new(self, conn: Connection, name: str, rows: list[tuple[Any, ...]], key: tuple[str, ...]) -> set[Any]:
        """Insert, skipping rows already stored; returns the keys of the rows that were new.

        Runs on an untyped `table()` because the rows are already in storage form (JSON as text).
        """
        if not rows:
            return set()
        columns = BULK_COLUMNS[name]
        table = sql_table(name, *(sql_column(c) for c in columns))
        stmt = self._insert(table).on_conflict_do_nothing().returning(*(table.c[k] for k in key))
        params = [dict(zip(columns, row, strict=True)) for row in rows]
        return {tuple(row) if len(key) > 1 else row[0] for row in conn.execute(stmt, params)}

    def _check_binning(
        self, conn: Connection, run_id: str, records: Sequence[RecordIn], rejected: list[RejectedItem]
    ) -> Sequence[RecordIn]:
        """A histogram key keeps one binning (lo, hi, bins) for the whole run, so steps line up and merge exactly.

        A histogram with another binning is refused alone (appended to `rejected`); returns the records without them.
        """
        seen: dict[str, tuple[float, float, int]] = {}
        refused: dict[int, set[str]] = {}
        for i, record in enumerate(records):
            for key, hist in record.histograms.items():
                binning = (hist.lo, hist.hi, len(hist.counts))
                if key not in seen:
                    row = conn.execute(
                        select(HistogramRow.lo, HistogramRow.hi, HistogramRow.bins)
                        .where(HistogramRow.run_id == run_id, HistogramRow.key == key)
                        .limit(1)
                    ).first()
                    seen[key] = tuple(row) if row is not None else binning  # type: ignore[assignment]
                if seen[key] != binning:
                    lo, hi, bins = seen[key]
                    refused.setdefault(i, set()).add(key)
                    rejected.append(
                        RejectedItem(
                            step=record.step,
                            field="histograms",
                            key=key,
                            reason=f"binning (lo={hist.lo}, hi={hist.hi}, bins={len(hist.counts)}) differs from this "
                            f"run's (lo={lo}, hi={hi}, bins={bins}); keep one binning per key or log under a new key",
                        )
                    )
        if not refused:
            return records
        return [
            r.model_copy(update={"histograms": {k: h for k, h in r.histograms.items() if k not in refused[i]}})
            if i in refused
            else r
            for i, r in enumerate(records)
        ]

    # rewind and fork --------------------------------------------------------------------

    def rewind(self, run_id: str, step: int) -> RewindOut:
        now = time.time()
        removed: dict[str, int] = {}
        with self._tx(write=True) as conn:
            last_step, evaluated, write_seq = self.runs.lock(conn, run_id)
            for name, table in (("scalars", ScalarRow), ("histograms", HistogramRow), ("outliers", OutlierRow)):
                removed[name] = conn.execute(delete(table).where(table.run_id == run_id, table.step > step)).rowcount
            removed["flags"] = conn.execute(
                delete(EventRow).where(
                    EventRow.run_id == run_id, EventRow.step > step, EventRow.kind.not_in(HISTORY_KINDS)
                )
            ).rowcount
            removed["alerts"] = conn.execute(
                update(AlertRow)
                .where(AlertRow.run_id == run_id, AlertRow.step > step, AlertRow.rewound_at.is_(None))
                .values(rewound_at=now)
            ).rowcount
            self._tiers.after_rewind(conn, run_id, step)
            moved = last_step is not None and last_step > step
            if moved or any(removed.values()):
                new_last = None if step < 0 or last_step is None else min(last_step, step)
                new_evaluated = None if step < 0 or evaluated is None else min(evaluated, step)
                conn.execute(
                    update(RunRow)
                    .where(RunRow.run_id == run_id)
                    .values(last_step=new_last, evaluated_step=new_evaluated, write_seq=write_seq + 1, updated_at=now)
                )
                summary = ", ".join(f"{n} {name}" for name, n in removed.items() if n) or "nothing stored"
                values = {
                    "message": f"history rewound to step {step}: removed {summary} after it",
                    "evidence": {"removed": removed, "previous_last_step": last_step},
                    "created_at": now,
                }
                # One event per rewind that changed something; a later rewind to the same step (after
                # re-logging) gets its own detector name, as events are unique per (run, kind, detector, step).
                earlier = conn.execute(
                    select(func.count())
                    .select_from(EventRow)
                    .where(EventRow.run_id == run_id, EventRow.kind == "rewind", EventRow.step == max(step, 0))
                ).scalar_one()
                conn.execute(
                    insert(EventRow).values(
                        run_id=run_id,
                        step=max(step, 0),
                        kind="rewind",
                        severity="info",
                        detector="rewind" if earlier == 0 else f"rewind-{earlier + 1}",
                        **values,
                    )
                )
        return RewindOut(run_id=run_id, step=step, removed=removed)

    def fork(self, run_id: str, step: int, name: str | None) -> Run:
        now = time.time()
        child = str(uuid.uuid4())
        with self._tx(write=True) as conn:
            parent_last, parent_evaluated, _ = self.runs.lock(conn, run_id)
            if parent_last is None or step > parent_last:
                raise Invalid(
                    ("step",),
                    f"{step} is past the run's last logged step ({parent_last}); fork at a step the run has logged",
                )
            parent = conn.execute(select(RunRow.__table__).where(RunRow.run_id == run_id)).one()
            child_name = name or f"{parent.name}-fork-{step}"
            conn.execute(
                insert(RunRow).values(
                    run_id=child,
                    project_id=parent.project_id,
                    name=child_name,
                    loss=parent.loss,
                    config=parent.config,
                    status="running",
                    created_at=now,
                    updated_at=now,
                    last_seen_at=None,
                    last_step=min(parent_last, step),
                    evaluated_step=None if parent_evaluated is None else min(parent_evaluated, step),
                    parent_run_id=run_id,
                    fork_step=step,
                )
            )
            for table in (ScalarRow, HistogramRow, OutlierRow):
                columns = [c.name for c in table.__table__.columns if c.name != "run_id"]
                source = select(literal(child), *(table.__table__.c[c] for c in columns)).where(
                    table.run_id == run_id, table.step <= step
                )
                conn.execute(insert(table).from_select(["run_id", *columns], source))
            self._tiers.after_fork(conn, run_id, child, step)
            flag_columns = ["step", "kind", "severity", "detector", "message", "evidence", "created_at"]
            conn.execute(
                insert(EventRow).from_select(
                    ["run_id", *flag_columns],
                    select(literal(child), *(EventRow.__table__.c[c] for c in flag_columns)).where(
                        EventRow.run_id == run_id, EventRow.step <= step, EventRow.kind.not_in(HISTORY_KINDS)
                    ),
                )
            )
            conn.execute(
                insert(EventRow),
                [
                    {
                        "run_id": child,
                        "step": step,
                        "kind": "fork",
                        "severity": "info",
                        "detector": "fork",
                        "message": f"forked from run {parent.name!r} ({run_id}) at step {step}",
                        "evidence": {"parent_run_id": run_id, "fork_step": step},
                        "created_at": now,
                    },
                    {
                        "run_id": run_id,
                        "step": step,
                        "kind": "fork",
                        "severity": "info",
                        "detector": child,
                        "message": f"forked into run {child_name!r} ({child}) at step {step}",
                        "evidence": {"child_run_id": child, "fork_step": step},
                        "created_at": now,
                    },
                ],
            )
            return self.runs.fetch(conn, child)


def _rows(run_id: str, records: Sequence[RecordIn], now: float) -> tuple[list[tuple[Any, ...]], ...]:
    """Row tuples in BULK_COLUMNS order: NaN scalars become (NULL, is_nan=1), histograms packed binary, outliers JSON."""
    scalars, hists, outliers = [], [], []
    for record in records:
        t = now if record.time is None else record.time
        step = record.step
        for key, value in record.scalars.items():
            scalars.append((run_id, key, step, None, 1, t) if value != value else (run_id, key, step, value, 0, t))
        for key, hist in record.histograms.items():
            counts = np.array([hist.underflow, hist.overflow, *hist.counts], dtype=COUNT_DTYPE).tobytes()
            stats = np.array([hist.min, hist.max, hist.sum, hist.sumsq], dtype=STAT_DTYPE).tobytes()
            hists.append((run_id, key, step, hist.lo, hist.hi, len(hist.counts), counts, stats, t))
        if record.outliers:
            outliers.append((run_id, step, dumps([o.model_dump() for o in record.outliers]), t))
    return scalars, hists, outliers


def _only_new(records: Sequence[RecordIn], scalars: set[Any], hists: set[Any], outliers: set[Any]) -> list[RecordIn]:
    """The records cut down to the items this batch stored first (for ingest listeners)."""
    out = []
    for record in records:
        kept = record.model_copy(
            update={
                "scalars": {k: v for k, v in record.scalars.items() if (k, record.step) in scalars},
                "histograms": {k: h for k, h in record.histograms.items() if (k, record.step) in hists},
                "outliers": record.outliers if record.step in outliers else [],
            }
        )
        if kept.items():
            out.append(kept)
    return out
