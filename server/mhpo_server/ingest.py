"""The one write path of the server: every route that changes a run's history calls `Ingest`.

v1 records, rewind and fork, and MLflow's log-batch, log-metric, log-parameter and set-tag
all go through here, so each takes the run's turn (in this process and across server
processes on one database), stores, evaluates flags and alert rules, and records health and
metrics the same way.

Evaluation is durable. A batch is committed first (what the client saw accepted survives
any crash); its flags and fired alerts are then stored in one transaction with the run's
evaluation position (`evaluated_step`, the last step judged). A server killed in between
leaves the run behind its stored steps: the run's next batch, a re-sent batch, or the
server's start judges the missed steps from the store before anything else, and the stored
flags and alerts are unique per step, so nothing fires twice. Rewinds and forks take the
run's turn too, so they see a batch with its flags or not at all.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from mhpo_server.health import ListenerHealth
from mhpo_server.metrics import ServiceMetrics
from mhpo_server.monitoring.listener import Evaluation, IngestMonitor
from mhpo_server.schemas import RecordIn, RejectedItem, RewindOut, Run
from mhpo_server.store import Stale, Store, StoreError, WriteResult

log = logging.getLogger(__name__)
IngestListener = Callable[[Store, str, Sequence[RecordIn]], Any]
CATCH_UP_STEPS = 1000  # stored steps judged per transaction when a run catches up
# Writes and evaluations of one run take turns (striped by run id in a process, the store's run
# turn across processes), so evaluation sees a run's batches in commit order. Writers of one run
# queue on the database anyway (SQLite's write lock, PostgreSQL's lock on the run row), so this
# costs no concurrency.
RUN_LOCKS = tuple(threading.Lock() for _ in range(64))


class Ingest:
    """Stores and evaluates; `listeners` are further callbacks on each batch's new records."""

    def __init__(
        self, store: Store, metrics: ServiceMetrics, health: ListenerHealth, monitor: IngestMonitor | None = None
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.health = health
        self.monitor = monitor
        self.listeners: list[IngestListener] = []

    @contextmanager
    def turn(self, run_id: str) -> Iterator[None]:
        """The run's turn: one writer or evaluator of the run at a time, across server processes."""
        with _stripe(run_id), self.store.run_turn(run_id):
            yield

    def write(
        self,
        run_id: str,
        batch_id: str,
        records: Sequence[RecordIn],
        rejected: Sequence[RejectedItem] = (),
        replay: bool = False,
    ) -> WriteResult:
        """Store a batch (idempotent by `batch_id`), then judge the steps it added and any the run missed.

        The common case, a batch judged on this process's current view of the run, is one
        transaction that checks the view itself, so it takes only the in-process lock. Any other
        batch is written and judged under the run's turn across processes.
        """
        with _stripe(run_id):
            result = self._write_prejudged(run_id, batch_id, records, rejected)
            if result is None:
                with self.store.run_turn(run_id):
                    result = self.store.write_records(run_id, batch_id, records, rejected)
                    self._evaluate(run_id, result)
            if result.new_records:
                for listener in self.listeners:
                    self._call(listener, run_id, result.new_records)
        self.metrics.batches.labels("duplicate" if not result.accepted and result.duplicates else "stored").inc()
        for table, count in result.rows.items():
            self.metrics.rows.labels(table).inc(count)
        if replay:
            self.metrics.spool_replays.inc()
        return result

    def rewind(self, run_id: str, step: int) -> RewindOut:
        with self.turn(run_id):
            result = self.store.rewind(run_id, step)
            if self.monitor is not None:
                self.monitor.forget(run_id)  # cached windows may hold rewound points
        return result

    def fork(self, run_id: str, step: int, name: str | None) -> Run:
        """The parent's turn: the copy holds each batch up to `step` with its flags, or not at all."""
        with self.turn(run_id):
            return self.store.fork(run_id, step, name)

    def merge_config(self, run_id: str, values: Mapping[str, Any], max_bytes: int | None = None) -> Run:
        with self.turn(run_id):
            return self.store.merge_config(run_id, values, max_bytes=max_bytes)

    def catch_up(self) -> int:
        """Judge every run whose stored steps are ahead of its evaluation (after a crash); returns how many."""
        done = 0
        for run_id, _evaluated, _last in self.store.behind():
            try:
                with self.turn(run_id):
                    position, last = self.store.evaluation_position(run_id)
                    if last is not None and (position is None or position < last):
                        self._catch_up(run_id, position, last)
                        done += 1
            except (StoreError, LookupError) as exc:
                log.error("run %s: catching up its evaluation failed: %s", run_id, exc)
        return done

    def _write_prejudged(
        self, run_id: str, batch_id: str, records: Sequence[RecordIn], rejected: Sequence[RejectedItem]
    ) -> WriteResult | None:
        """The batch judged on the cached view and stored with its flags in one transaction; None if it cannot be."""
        if self.monitor is None:
            return None
        try:
            pending = self.monitor.prejudge(self.store, run_id, records)
        except Exception:
            log.exception("run %s: judging a batch before its write failed; it is judged after", run_id)
            return None
        if pending is None:
            return None
        try:
            result = self.store.write_records(run_id, batch_id, records, rejected, pending.prejudged)
        except Stale:
            self.monitor.forget(run_id)  # rule states moved on with a batch that was not stored
            return None
        except BaseException:
            self.monitor.forget(run_id)
            raise
        try:
            self.monitor.written(run_id, pending, result)
        except Exception as exc:  # the flags and alerts are stored; only the webhook hand-off failed
            self.health.failed(self.monitor, self.store, run_id, result.new_records, exc)
        else:
            self.health.succeeded(self.monitor)
        return result

    def _evaluate(self, run_id: str, result: WriteResult) -> None:
        if self.monitor is None or result.last_step is None:
            return
        try:
            if not result.caught_up:
                self._catch_up(run_id, result.evaluated_step, result.last_step)
            elif result.new_records:
                evaluation = self.monitor.evaluate(self.store, run_id, result.new_records, result.write_seq)
                self._store(run_id, result.last_step, evaluation)
        except Exception as exc:
            self.health.failed(self.monitor, self.store, run_id, result.new_records, exc)
        else:
            self.health.succeeded(self.monitor)

    def _catch_up(self, run_id: str, position: int | None, last: int) -> None:
        """Judge the stored steps in (position, last] from the store, a chunk per transaction."""
        assert self.monitor is not None
        while True:
            steps = self.store.scalar_steps_between(run_id, position, last, CATCH_UP_STEPS)
            if len(steps) < CATCH_UP_STEPS:
                evaluation = self.monitor.evaluate_stored(self.store, run_id, steps) if steps else Evaluation()
                self._store(run_id, last, evaluation)
                return
            self._store(run_id, steps[-1], self.monitor.evaluate_stored(self.store, run_id, steps))
            position = steps[-1]

    def _store(self, run_id: str, through_step: int, evaluation: Evaluation) -> None:
        assert self.monitor is not None
        ids = self.store.commit_evaluation(run_id, through_step, evaluation.events, evaluation.alerts)
        self.monitor.stored(evaluation, ids)

    def _call(self, listener: IngestListener, run_id: str, records: Sequence[RecordIn]) -> None:
        try:
            listener(self.store, run_id, records)
        except Exception as exc:
            self.health.failed(listener, self.store, run_id, records, exc)
        else:
            self.health.succeeded(listener)

    def lag(self) -> dict[str, int]:
        """For /healthz: runs whose stored steps are ahead of their evaluation, and the largest gap in steps."""
        behind = self.store.behind()
        gaps = [last - (-1 if evaluated is None else evaluated) for _, evaluated, last in behind]
        return {"runs_behind": len(behind), "max_steps_behind": max(gaps, default=0)}


def _stripe(run_id: str) -> threading.Lock:
    """The run's in-process lock (`RUN_LOCKS` striped by run id)."""
    return RUN_LOCKS[uuid.UUID(run_id).int % len(RUN_LOCKS)]
