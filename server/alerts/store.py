"""SQL access for flags and alerts: rules, fired alerts, detector overrides, bounded history reads.

It shares the `SqlStore`'s engine (so its pool and SQLite pragmas), and returns pydantic
models or plain tuples, never ORM rows. Every method is one short transaction, so the
webhook worker thread can call it beside the request threads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from server.alerts.models import AlertRow, AlertRuleRow, FlagParamsRow
from server.alerts.schemas import Alert, AlertRule, AlertRuleCreate, AlertRulePatch
from server.store.models import EventRow, ScalarRow

IN_CHUNK = 500


class AlertStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = sqlite.insert if engine.dialect.name == "sqlite" else postgresql.insert

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # detector parameters ----------------------------------------------------------------

    def get_flag_params(self, project: str) -> dict[str, Any]:
        with self._tx() as conn:
            row = conn.execute(select(FlagParamsRow.params).where(FlagParamsRow.project == project)).first()
        return dict(row[0]) if row else {}

    def set_flag_params(self, project: str, overrides: dict[str, Any]) -> None:
        now = time.time()
        with self._tx() as conn:
            stmt = self._insert(FlagParamsRow.__table__).values(project=project, params=overrides, updated_at=now)
            conn.execute(
                stmt.on_conflict_do_update(index_elements=["project"], set_={"params": overrides, "updated_at": now})
            )

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
        return self.get_rule(rule_id)

    def get_rule(self, rule_id: int) -> AlertRule:
        with self._tx() as conn:
            row = conn.execute(select(AlertRuleRow.__table__).where(AlertRuleRow.id == rule_id)).first()
        if row is None:
            raise LookupError(f"alert rule id {rule_id} does not exist: list rules with GET /api/v1/alert-rules")
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
        return [r for r in self.list_rules(project, run_id) if r.enabled]

    def update_rule(self, rule_id: int, patch: AlertRulePatch) -> AlertRule:
        current = self.get_rule(rule_id)
        changes = patch.model_dump(mode="json", exclude_unset=True)
        merged = AlertRuleCreate.model_validate(
            {**current.model_dump(mode="json", exclude={"id", "created_at", "updated_at"}), **changes}
        )
        values = merged.model_dump(mode="json")
        values["updated_at"] = time.time()
        with self._tx() as conn:
            conn.execute(update(AlertRuleRow).where(AlertRuleRow.id == rule_id).values(**values))
        return self.get_rule(rule_id)

    def delete_rule(self, rule_id: int) -> None:
        self.get_rule(rule_id)
        with self._tx() as conn:
            conn.execute(update(AlertRow).where(AlertRow.rule_id == rule_id).values(rule_id=None))
            conn.execute(delete(AlertRuleRow).where(AlertRuleRow.id == rule_id))

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
            .on_conflict_do_nothing(index_elements=["rule_id", "run_id", "step"])
            .returning(AlertRow.id)
        )
        with self._tx() as conn:
            found = conn.execute(stmt).first()
        return None if found is None else int(found[0])

    def get_alert(self, alert_id: int) -> Alert:
        with self._tx() as conn:
            row = conn.execute(select(AlertRow.__table__).where(AlertRow.id == alert_id)).first()
        if row is None:
            raise LookupError(f"alert id {alert_id} does not exist: list alerts with GET /api/v1/alerts")
        return Alert.model_validate(dict(row._mapping))

    def list_alerts(
        self,
        project: str | None = None,
        run_id: str | None = None,
        acknowledged: bool | None = None,
        limit: int = 1000,
    ) -> list[Alert]:
        query = select(AlertRow.__table__).order_by(AlertRow.created_at.desc(), AlertRow.id.desc()).limit(limit)
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

    def window_start(self, run_id: str, key: str, before_step: int, points: int) -> int:
        """The step `points` logged points of `key` before `before_step` (or the first step)."""
        recent = (
            select(ScalarRow.step)
            .where(ScalarRow.run_id == run_id, ScalarRow.key == key, ScalarRow.step < before_step)
            .order_by(ScalarRow.step.desc())
            .limit(points)
            .subquery()
        )
        with self._tx() as conn:
            found = conn.execute(select(func.min(recent.c.step))).scalar()
        return before_step if found is None else int(found)

    def scalar_rows(self, run_id: str, keys: Sequence[str], start: int, end: int) -> list[tuple[str, int, float]]:
        """(key, step, value) of `keys` in [start, end], NaN restored from the `is_nan` marker."""
        out: list[tuple[str, int, float]] = []
        keys = sorted(set(keys))
        with self._tx() as conn:
            for i in range(0, len(keys), IN_CHUNK):
                query = select(ScalarRow.key, ScalarRow.step, ScalarRow.value, ScalarRow.is_nan).where(
                    ScalarRow.run_id == run_id,
                    ScalarRow.key.in_(keys[i : i + IN_CHUNK]),
                    ScalarRow.step >= start,
                    ScalarRow.step <= end,
                )
                out.extend(
                    (k, int(s), float("nan") if n or v is None else float(v)) for k, s, v, n in conn.execute(query)
                )
        return out

    def last_flag_steps(self, run_id: str, kinds: Sequence[str], before_step: int) -> dict[str, int]:
        """kind -> the latest flagged step below `before_step` (for the refractory period)."""
        query = (
            select(EventRow.kind, func.max(EventRow.step))
            .where(EventRow.run_id == run_id, EventRow.kind.in_(list(kinds)), EventRow.step < before_step)
            .group_by(EventRow.kind)
        )
        with self._tx() as conn:
            return {kind: int(step) for kind, step in conn.execute(query)}
