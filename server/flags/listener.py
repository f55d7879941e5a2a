"""The ingest listener (contract C5): flags and alert rules evaluated on every stored batch.

For each batch it reads a bounded window of the run's history (the detectors' and the
rules' look-back, counted in logged points of a reference key) in one query, runs the
detectors on the new steps only, stores the flags (the events table ignores a flag
already stored for (run, kind, detector, step)), evaluates the enabled rules of the
run's project, stores fired alerts and hands webhooks to the background dispatcher.
Only newly stored records reach a listener, so a re-sent batch is never evaluated twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from server.alerts import rules as alert_rules
from server.alerts.schemas import AlertRule, FlagCondition
from server.alerts.store import AlertStore
from server.alerts.webhook import WebhookDispatcher
from server.flags.detectors import Flag, History, detect
from server.flags.params import DEFAULT_PARAMS, FlagParams
from server.schemas import RecordIn
from server.store import Store

log = logging.getLogger(__name__)


class IngestMonitor:
    def __init__(
        self, alerts: AlertStore, dispatcher: WebhookDispatcher | None, defaults: FlagParams = DEFAULT_PARAMS
    ) -> None:
        self.alerts = alerts
        self.dispatcher = dispatcher
        self.defaults = defaults

    def params_for(self, project: str) -> FlagParams:
        return self.defaults.merged(self.alerts.get_flag_params(project))

    def __call__(self, store: Store, run_id: str, new_records: Sequence[RecordIn]) -> list[Flag]:
        steps = sorted({r.step for r in new_records if r.scalars})
        if not steps:
            return []
        project = store.get_run(run_id).project
        params = self.params_for(project)
        rules = self.alerts.active_rules(project, run_id)
        new_keys = {k for r in new_records for k in r.scalars}
        rule_keys = {r.condition.key for r in rules if not isinstance(r.condition, FlagCondition)}
        keys = params.keys() | new_keys | rule_keys
        points = max([params.history_steps(), *(alert_rules.history_points(r) for r in rules)])
        reference = min(new_keys)
        start = self.alerts.window_start(run_id, reference, steps[0], points)
        history = History.from_rows(self.alerts.scalar_rows(run_id, sorted(keys), start, steps[-1]))
        refractory = self.alerts.last_flag_steps(run_id, ("collapse", "erosion"), steps[0])
        flags = detect(history, steps, params, refractory)
        if flags:
            store.add_events(run_id, [f.as_event() for f in flags])
        if rules:
            self._fire(project, run_id, alert_rules.evaluate(rules, history, steps, flags))
        return flags

    def _fire(self, project: str, run_id: str, firings: Sequence[alert_rules.Firing]) -> None:
        now = time.time()
        last: dict[int, float | None] = {}
        for firing in firings:
            rule: AlertRule = firing.rule
            if rule.id not in last:
                last[rule.id] = self.alerts.last_fired(rule.id, run_id)
            previous = last[rule.id]
            if previous is not None and now - previous < rule.cooldown_s:
                continue
            webhook = "webhook" in rule.channels and rule.webhook_url is not None
            alert_id = self.alerts.add_alert(
                {
                    "rule_id": rule.id,
                    "rule_name": rule.name,
                    "project": project,
                    "run_id": run_id,
                    "step": firing.step,
                    "severity": rule.severity,
                    "message": firing.message,
                    "evidence": firing.evidence,
                    "created_at": now,
                    "delivery_status": "pending" if webhook else "none",
                }
            )
            if alert_id is None:
                continue
            last[rule.id] = now
            if webhook and self.dispatcher is not None:
                self.dispatcher.submit(self.alerts.get_alert(alert_id), str(rule.webhook_url))
