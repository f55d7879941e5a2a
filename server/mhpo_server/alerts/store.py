"""SQL access for flags and alerts: rules, fired alerts, detector overrides, bounded history reads.

It shares the `SqlStore`'s engine (so its pool and SQLite pragmas), and returns pydantic
models or plain tuples, never ORM rows. Every method is one short transaction, so the
webhook worker thread can call it beside the request threads.

The ingest listener asks for a project's detector overrides and enabled rules on every
batch, so those are cached in memory: every change made through this store clears the
cache at once, and an entry lives at most `config_ttl_s` seconds, so a change made by
another server process on the same database takes effect within that time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, literal, or_, select, union_all, update
from sqlalchemy.dialects import postgresql, sqlite

from mhpo_server.alerts.schemas import Alert, AlertRule, AlertRuleCreate, AlertRulePatch
from mhpo_server.store.models import AlertRow, AlertRuleRow, BatchRow, EventRow, FlagParamsRow, ScalarRow

NULLABLE_RULE_FIELDS = frozenset({"run_id", "webhook_url"})  # PATCH null clears these; other fields ignore null
WINDOW_CHUNK = 100  # keys per UNION ALL statement: 2 selects per key, SQLite allows 500 per compound select


class AlertStore:
    def __init__(self, engine: Engine, config_ttl_s: float = 2.0) -> None:
        self.engine = engine
        self._insert = sqlite.insert if engine.dialect.name == "sqlite" else postgresql.insert
        self.config_ttl_s = config_ttl_s
        self._config: dict[tuple[str, str], tuple[float, Any]] = {}
        self._config_lock = threading.Lock()
        self._generation = 0

    def _cached(self, kind: str, project: str, load: Callable[[], Any]) -> Any:
        """`load()` cached per (kind, project) for `config_ttl_s` seconds or until a change through this store."""
        now = time.monotonic()
        with self._config_lock:
            found = self._config.get((kind, project))
            generation = self._generation
        if found is not None and now - found[0] < self.config_ttl_s:
            return found[1]
        value = load()
        with self._config_lock:
            if self._generation == generation:  # no change was made while loading
                self._config[(kind, project)] = (now, value)
        return value

    def _changed(self) -> None:
        with self._config_lock:
            self._config = {}
            self._generation += 1

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # detector parameters ----------------------------------------------------------------

    def get_flag_params(self, project: str) -> dict[str, Any]:
        with self._tx() as conn:
            row = conn.execute(select(FlagParamsRow.params).where(FlagParamsRow.project == project)).first()
        return dict(row[0]) if row else {}

    def cached_flag_params(self, project: str) -> dict[str, Any]:
        """`get_flag_params`, cached (see the module docstring); the caller must not mutate the result."""
        return self._cached("params", project, lambda: self.get_flag_params(project))

    def set_flag_params(self, project: str, overrides: dict[str, Any]) -> None:
        now = time.time()
        with self._tx() as conn:
            stmt = self._insert(FlagParamsRow.__table__).values(project=project, params=overrides, updated_at=now)
            conn.execute(
                stmt.on_conflict_do_update(index_elements=["project"], set_={"params": overrides, "updated_at": now})
            )
        self._changed()

    # rules ------------------------------------------------------------------------------

    @staticmethod
    def _rule(row: Any) -> AlertRule:
        return AlertRule.model_validate(dict(row._mapping))

    def create_rule(self, rule: AlertRuleCreate) -> AlertRule:
        now = time.time()
        values = rule.model_dump(mode="json")
        values.update(created_at=now, updated_at=now)
        with self._tx() as conn:
            rule_id = conn.execute(insert(AlertRuleRow).values(**values).returning(AlertRuleRow.id)).scalar_one()
        self._changed()
        return self.get_rule(rule_id)

    @staticmethod
    def missing_rule(rule_id: int) -> str:
        return f"alert rule id {rule_id} does not exist: list rules with GET /api/v1/alert-rules"

    @staticmethod
    def missing_alert(alert_id: int) -> str:
        return f"alert id {alert_id} does not exist: list alerts with GET /api/v1/alerts"

    def get_rule(self, rule_id: int) -> AlertRule:
        with self._tx() as conn:
            row = conn.execute(select(AlertRuleRow.__table__).where(AlertRuleRow.id == rule_id)).first()
        if row is None:
            raise LookupError(self.missing_rule(rule_id))
        return self._rule(row)

    def list_rules(self, project: str | None = None, run_id: str | None = None) -> list[AlertRule]:
        query = select(AlertRuleRow.__table__).order_by(AlertRuleRow.id)
        if project is not None:
            query = query.where(AlertRuleRow.project == project)
        if run_id is not None:
            query = query.where(or_(AlertRuleRow.run_id.is_(None), AlertRuleRow.run_id == run_id))
        with self._tx() as conn:
            return [self._rule(row) for row in conn.execute(query)]

    def active_rules(self, project: str, run_id: str) -> list[AlertRule]:
        """The enabled rules of `project` that apply to `run_id` (cached, see the module docstring)."""
        rules: list[AlertRule] = self._cached(
            "rules", project, lambda: [r for r in self.list_rules(project) if r.enabled]
        )
        return [r for r in rules if r.run_id is None or r.run_id == run_id]

    def update_rule(self, rule_id: int, patch: AlertRulePatch) -> AlertRule:
        current = self.get_rule(rule_id)
        changes = {
            k: v
            for k, v in patch.model_dump(mode="json", exclude_unset=True).items()
            if v is not None or k in NULLABLE_RULE_FIELDS
        }
        merged = AlertRuleCreate.model_validate(
            {**current.model_dump(mode="json", exclude={"id", "created_at", "updated_at"}), **changes}
        )
        values = merged.model_dump(mode="json")
        values["updated_at"] = time.time()
        with self._tx() as conn:
            conn.execute(update(AlertRuleRow).where(AlertRuleRow.id == rule_id).values(**values))
        self._changed()
        return self.get_rule(rule_id)

    def delete_rule(self, rule_id: int) -> None:
        self.get_rule(rule_id)
        with self._tx() as conn:
            conn.execute(update(AlertRow).where(AlertRow.rule_id == rule_id).values(rule_id=None))
            conn.execute(delete(AlertRuleRow).where(AlertRuleRow.id == rule_id))
        self._changed()

    # fired alerts -----------------------------------------------------------------------

    def last_fired(self, rule_id: int, run_id: str) -> float | None:
        with self._tx() as conn:
            return conn.execute(
                select(func.max(AlertRow.created_at)).where(AlertRow.rule_id == rule_id, AlertRow.run_id == run_id)
            ).scalar()

    def add_alert(self, values: dict[str, Any]) -> int | None:
        """Store a fired alert; None when (rule, run, step) already fired (a re-sent record)."""
        row = {"acknowledged_at": None, "delivery_attempts": 0, "delivery_error": None, "delivered_at": None, **values}
        stmt = (
            self._insert(AlertRow.__table__)
            .values(**row)
            .on_conflict_do_nothing(
                index_elements=["rule_id", "run_id", "step"], index_where=AlertRow.rewound_at.is_(None)
            )
            .returning(AlertRow.id)
        )
        with self._tx() as conn:
            found = conn.execute(stmt).first()
        return None if found is None else int(found[0])

    def get_alert(self, alert_id: int) -> Alert:
        with self._tx() as conn:
            row = conn.execute(select(AlertRow.__table__).where(AlertRow.id == alert_id)).first()
        if row is None:
            raise LookupError(self.missing_alert(alert_id))
        return Alert.model_validate(dict(row._mapping))

    def list_alerts(
        self,
        project: str | None = None,
        run_id: str | None = None,
        acknowledged: bool | None = None,
        limit: int = 1000,
        after_id: int | None = None,
        since: float | None = None,
    ) -> list[Alert]:
        """Newest first; `after_id` and `since` as in `Store.list_events` (an incremental read of a run's alerts)."""
        query = select(AlertRow.__table__).order_by(AlertRow.created_at.desc(), AlertRow.id.desc()).limit(limit)
        if after_id is not None:
            newer = AlertRow.id > after_id
            query = query.where(newer if since is None else or_(newer, AlertRow.created_at >= since))
        if project is not None:
            query = query.where(AlertRow.project == project)
        if run_id is not None:
            query = query.where(AlertRow.run_id == run_id)
        if acknowledged is not None:
            query = query.where(
                AlertRow.acknowledged_at.is_not(None) if acknowledged else AlertRow.acknowledged_at.is_(None)
            )
        with self._tx() as conn:
            return [Alert.model_validate(dict(row._mapping)) for row in conn.execute(query)]

    def acknowledge(self, alert_id: int) -> Alert:
        self.get_alert(alert_id)
        with self._tx() as conn:
            conn.execute(
                update(AlertRow)
                .where(AlertRow.id == alert_id, AlertRow.acknowledged_at.is_(None))
                .values(acknowledged_at=time.time())
            )
        return self.get_alert(alert_id)

    def set_delivery(self, alert_id: int, status: str, attempts: int, error: str | None) -> None:
        delivered_at = time.time() if status == "delivered" else None
        with self._tx() as conn:
            conn.execute(
                update(AlertRow)
                .where(AlertRow.id == alert_id)
                .values(
                    delivery_status=status, delivery_attempts=attempts, delivery_error=error, delivered_at=delivered_at
                )
            )

    def pending_deliveries(self) -> list[Alert]:
        """Alerts whose webhook was not yet delivered or given up on (e.g. the server stopped meanwhile)."""
        with self._tx() as conn:
            rows = conn.execute(select(AlertRow.__table__).where(AlertRow.delivery_status == "pending"))
            return [Alert.model_validate(dict(row._mapping)) for row in rows]

    # bounded history for the detectors ------------------------------------------------

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
        with self._tx() as conn:
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

    def scalar_keys_between(self, run_id: str, first: int, last: int) -> list[str]:
        """The keys with a point in steps [first, last]."""
        query = (
            select(ScalarRow.key)
            .where(ScalarRow.run_id == run_id, ScalarRow.step >= first, ScalarRow.step <= last)
            .distinct()
        )
        with self._tx() as conn:
            return list(conn.execute(query).scalars())

    def scalar_steps_between(self, run_id: str, after: int | None, last: int, limit: int) -> list[int]:
        """The first `limit` steps with a stored scalar in (after, last], ascending."""
        query = select(ScalarRow.step).where(ScalarRow.run_id == run_id, ScalarRow.step <= last)
        if after is not None:
            query = query.where(ScalarRow.step > after)
        query = query.distinct().order_by(ScalarRow.step).limit(limit)
        with self._tx() as conn:
            return [int(step) for step in conn.execute(query).scalars()]

    def batch_count(self, run_id: str) -> int:
        """How many batches the run has stored (the flags listener's check that no other process wrote one)."""
        with self._tx() as conn:
            return int(conn.execute(select(func.count()).where(BatchRow.run_id == run_id)).scalar_one())

    def last_flag_steps(self, run_id: str, kinds: Sequence[str], before_step: int) -> dict[tuple[str, str], int]:
        """(kind, severity) -> the latest flagged step below `before_step` (for the refractory period)."""
        query = (
            select(EventRow.kind, EventRow.severity, func.max(EventRow.step))
            .where(EventRow.run_id == run_id, EventRow.kind.in_(list(kinds)), EventRow.step < before_step)
            .group_by(EventRow.kind, EventRow.severity)
        )
        with self._tx() as conn:
            return {(kind, severity): int(step) for kind, severity, step in conn.execute(query)}
