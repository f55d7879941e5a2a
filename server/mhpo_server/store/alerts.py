"""Alerts and rules: rules, fired alerts, per-project detector overrides.

A part of the `SqlStore` (`store.alerts`) on its `Database`, so its pool and SQLite pragmas;
it returns pydantic models, never ORM rows. Every method is one short transaction, so the
webhook worker thread can call it beside the request threads.

The ingest listener asks for a project's detector overrides and enabled rules on every
batch, so those are cached in memory: every change made through this store clears the
cache at once, and an entry lives at most `config_ttl_s` seconds, so a change made by
another server process on the same database takes effect within that time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update

from mhpo_server.monitoring.schemas import Alert, AlertRule, AlertRuleCreate, AlertRulePatch
from mhpo_server.store.engine import Database
from mhpo_server.store.models import AlertRow, AlertRuleRow, FlagParamsRow

NULLABLE_RULE_FIELDS = frozenset({"run_id", "webhook_url"})  # PATCH null clears these; other fields ignore null


class AlertStore:
    def __init__(self, db: Database, config_ttl_s: float = 2.0) -> None:
        self.db = db
        self._insert = db.insert
        self._tx = db.plain_tx  # rule evaluation and the webhook workers report their own failures
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
