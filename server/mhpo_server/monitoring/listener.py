"""The ingest listener (contract C5): flags and alert rules evaluated on every stored batch.

For each batch it builds a bounded window of the run's history (per key, the detectors'
and the rules' look-back in logged points before the first new step, plus the new
points), runs the detectors on the new steps only, stores the flags (the events table
ignores a flag already stored for (run, kind, detector, step)), evaluates the enabled
rules of the run's project, stores fired alerts and hands webhooks to the background
dispatcher. Only newly stored records reach a listener, so a re-sent batch is never
evaluated twice.

The windows live in memory (`WindowCache`: the last points of each key, for the most
recently written runs), seeded from the store on a run's first batch (or after a restart
or an eviction) and extended with each batch's new points, so a batch in step order costs
no history read. A key whose cached points reach the batch's first step (an
out-of-order or overlapping batch) is read from the store again, so the window is always
the one a cold read would give and the flags do not depend on the cache.

Several server processes on one database (`mhpo serve --workers N`, or replicas): the
detectors are pure functions of the stored points and the stored flags, so any process
computes the same flags from a cold read. A cached window is used only when the run's
stored batch count is the one this process saw after its own previous batch plus this
batch; when another process wrote in between, the windows are read again from the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mhpo_server.monitoring import rules as alert_rules
from mhpo_server.monitoring.detectors import Flag, History, detect, refractory_kinds, refractory_state
from mhpo_server.monitoring.params import DEFAULT_PARAMS, FlagParams
from mhpo_server.monitoring.schemas import AlertRule, FlagCondition
from mhpo_server.monitoring.webhook import WebhookDispatcher
from mhpo_server.schemas import EventCreate, RecordIn
from mhpo_server.store import AlertStore, Prejudged, Store, WriteResult

log = logging.getLogger(__name__)

Points = tuple[np.ndarray, np.ndarray]  # (steps int64 ascending, values float64)
EMPTY: Points = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))


@dataclass
class RunWindows:
    """The newest `depth` points of some keys of one run: complete for every key it holds."""

    project: str
    depth: int
    loss: str | None = None  # the run's loss, for the detectors whose bounds depend on it
    series: dict[str, Points] = field(default_factory=dict)
    # The first points of the keys the state detectors take an early reference from (complete once full).
    heads: dict[str, Points] = field(default_factory=dict)
    write_seq: int = -1  # the run's count of history changes after the last batch judged here
    # Latest flagged step per refractory key (`detect`'s `last_flagged`), read for `params`.
    refractory: dict[str, int] | None = None
    params: FlagParams | None = None

    def copy(self) -> RunWindows:
        """A view to judge a batch on before it is written: the cache keeps the original until the write succeeds."""
        refractory = None if self.refractory is None else dict(self.refractory)
        return replace(self, series=dict(self.series), heads=dict(self.heads), refractory=refractory)


@dataclass
class Pending:
    """A batch judged before its write: what the store keeps with it, and the view to cache if it does."""

    prejudged: Prejudged
    evaluation: Evaluation
    view: RunWindows


class WindowCache:
    """Per-run windows, least recently used runs dropped beyond `max_runs`."""

    def __init__(self, max_runs: int = 1024) -> None:
        self.max_runs = max_runs
        self._runs: OrderedDict[str, RunWindows] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_id: str) -> RunWindows | None:
        with self._lock:
            found = self._runs.get(run_id)
            if found is not None:
                self._runs.move_to_end(run_id)
            return found

    def put(self, run_id: str, windows: RunWindows) -> None:
        with self._lock:
            self._runs[run_id] = windows
            self._runs.move_to_end(run_id)
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)

    def drop(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def __len__(self) -> int:
        return len(self._runs)


def _new_points(records: Sequence[RecordIn]) -> dict[str, Points]:
    """key -> (steps, values) of the batch, ascending; the first value of a repeated (key, step) wins, as in the store."""
    steps_of: dict[str, list[int]] = {}
    values_of: dict[str, list[float]] = {}
    for record in records:
        step = record.step
        for key, value in record.scalars.items():
            if key in steps_of:
                steps_of[key].append(step)
                values_of[key].append(value)
            else:
                steps_of[key] = [step]
                values_of[key] = [value]
    out = {}
    for key, step_list in steps_of.items():
        steps = np.array(step_list, dtype=np.int64)
        values = np.array(values_of[key], dtype=np.float64)
        if len(steps) > 1 and not bool(np.all(steps[1:] > steps[:-1])):
            steps, first = np.unique(steps, return_index=True)  # sorted; index of each step's first occurrence
            values = values[first]
        out[key] = (steps, values)
    return out


def _quiet_keys(new: dict[str, Points], watched: set[str], batch_steps: int) -> set[str]:
    """Keys of the batch that cannot raise anything: no detector or rule reads them by name, and they
    hold a finite value at every step of the batch, so the non-finite check (the only one that reads
    every key) has nothing to find. Their windows are neither read nor judged, which keeps a batch of
    thousands of new keys (one MLflow batch can make them) cheap."""
    return {
        key
        for key, (steps, values) in new.items()
        if len(steps) == batch_steps and key not in watched and bool(np.isfinite(values).all())
    }


def _from_rows(rows: Sequence[tuple[str, int, float]]) -> dict[str, Points]:
    by_key: dict[str, dict[int, float]] = {}
    for key, step, value in rows:
        by_key.setdefault(key, {})[step] = value
    out = {}
    for key, by_step in by_key.items():
        steps = sorted(by_step)
        out[key] = (np.array(steps, dtype=np.int64), np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def _union(first: Points, second: Points) -> Points:
    """The points of both, ascending by step; `first`'s value wins at a step both hold."""
    steps, index = np.unique(np.concatenate([first[0], second[0]]), return_index=True)
    return steps, np.concatenate([first[1], second[1]])[index]


def _with_heads(series: dict[str, Points], heads: dict[str, Points]) -> dict[str, Points]:
    """`series` with each key's first points put before its window (the gap between them is never judged)."""
    out = dict(series)
    for key, head in heads.items():
        out[key] = _union(head, out.get(key, EMPTY))
    return out


def stored_history(
    store: Store, run_id: str, params: FlagParams, keys: Iterable[str], first: int, last: int, depth: int
) -> History:
    """The detectors' view of a run's stored steps [first, last], read cold: per key its `depth` points before
    `first` and its points in the range, after the first points of `params`' head keys (the early reference)."""
    wanted = sorted(set(keys))
    rows, _ = store.scalar_windows(run_id, wanted, first, last, depth)
    series = _from_rows(rows)
    heads = _from_rows(store.scalar_heads(run_id, sorted(params.head_keys()), params.head_points()))
    return History.from_arrays(_with_heads({key: series.get(key, EMPTY) for key in wanted}, heads))


@dataclass
class Evaluation:
    """What judging some steps of a run produced, before it is stored: flags and alerts that fired."""

    flags: list[Flag] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    webhooks: dict[int, str] = field(default_factory=dict)  # index in `alerts` -> webhook URL

    @property
    def events(self) -> list[EventCreate]:
        return [EventCreate.model_validate(f.as_event()) for f in self.flags]


class IngestMonitor:
    """Judges a run's new steps: the detectors' flags and the project's alert rules.

    It reads and caches history but writes nothing: the ingest service stores an
    `Evaluation` with the run's evaluation position in one transaction, then calls
    `delivered` so webhooks go out only for alerts that were stored.
    """

    def __init__(
        self,
        alerts: AlertStore,
        dispatcher: WebhookDispatcher | None,
        defaults: FlagParams = DEFAULT_PARAMS,
        cache: WindowCache | None = None,
    ) -> None:
        self.alerts = alerts
        self.dispatcher = dispatcher
        self.defaults = defaults
        self.cache = cache if cache is not None else WindowCache()
        self.rule_states = alert_rules.RuleStates()
        self._merged: dict[str, tuple[dict[str, Any], FlagParams]] = {}

    def params_for(self, project: str) -> FlagParams:
        overrides = self.alerts.cached_flag_params(project)
        found = self._merged.get(project)
        if found is None or found[0] is not overrides:
            found = (overrides, self.defaults.merged(overrides))
            self._merged[project] = found
        return found[1]

    def forget(self, run_id: str) -> None:
        """Drop what is held about the run (its history was rewound, or an evaluation failed half way)."""
        self.cache.drop(run_id)
        self.rule_states.drop_run(run_id)

    def prejudge(self, store: Store, run_id: str, records: Sequence[RecordIn]) -> Pending | None:
        """Judge a batch before it is written, from this process's cached view of the run (None without one).

        Valid only if the batch is stored whole as the run's newest steps with nothing written in
        between, which the store checks in the batch's transaction (`Prejudged`, else `Stale`).
        Call `written` after the write, or `forget` if it did not happen.
        """
        cached = self.cache.get(run_id)
        if cached is None or cached.refractory is None:
            return None
        try:
            evaluation, view = self._evaluate(store, run_id, records, cached.copy(), written=False)
        except BaseException:
            self.forget(run_id)
            raise
        if view is None:
            return None
        prejudged = Prejudged(write_seq=cached.write_seq, events=evaluation.events, alerts=evaluation.alerts)
        return Pending(prejudged, evaluation, view)

    def written(self, run_id: str, pending: Pending, result: WriteResult) -> None:
        """The store kept the batch with its prejudged evaluation: the view becomes the cache, webhooks go out."""
        pending.view.write_seq = result.write_seq
        self.cache.put(run_id, pending.view)
        self.stored(pending.evaluation, result.alert_ids)

    def evaluate(self, store: Store, run_id: str, new_records: Sequence[RecordIn], write_seq: int) -> Evaluation:
        """Judge the new records of a batch just stored (the run's `write_seq` after it), earlier steps being judged."""
        cached = self.cache.get(run_id)
        if cached is not None and cached.write_seq != write_seq - 1:
            cached = None  # another process changed the run since: its points are not in the cache
        try:
            evaluation, view = self._evaluate(store, run_id, new_records, cached, written=True)
        except BaseException:
            self.forget(run_id)  # the window may be half updated; the next batch reads it again
            raise
        if view is not None:
            view.write_seq = write_seq
            self.cache.put(run_id, view)
        return evaluation

    def evaluate_stored(self, store: Store, run_id: str, steps: Sequence[int]) -> Evaluation:
        """Judge stored steps (ascending) from a cold read: a run that fell behind catches up."""
        self.forget(run_id)
        run = store.get_run(run_id)
        project = run.project
        params = self.params_for(project)
        rules = self.alerts.active_rules(project, run_id)
        keys = params.keys() | {r.condition.key for r in rules if not isinstance(r.condition, FlagCondition)}
        keys |= set(store.scalar_keys_between(run_id, steps[0], steps[-1]))
        depth = max([params.history_steps(), *(alert_rules.history_points(r) for r in rules)])
        history = stored_history(store, run_id, params, keys, steps[0], steps[-1], depth)
        refractory = refractory_state(store.last_flag_steps(run_id, refractory_kinds(params), steps[0]))
        return self._judge(project, run_id, params, rules, history, list(steps), refractory, run.loss)

    def _evaluate(
        self, store: Store, run_id: str, new_records: Sequence[RecordIn], cached: RunWindows | None, written: bool
    ) -> tuple[Evaluation, RunWindows | None]:
        """Judge the batch on `cached` extended with its points (updated in place, or a new view if None).

        `written`: whether the batch is stored already (a key read from the store then has its points).
        """
        new = _new_points(new_records)
        if not new:
            return Evaluation(), cached
        steps = sorted({int(s) for steps, _ in new.values() for s in steps.tolist()})
        if cached is not None:
            project, loss = cached.project, cached.loss
        else:
            run = store.get_run(run_id)
            project, loss = run.project, run.loss
        params = self.params_for(project)
        rules = self.alerts.active_rules(project, run_id)
        rule_keys = {r.condition.key for r in rules if not isinstance(r.condition, FlagCondition)}
        quiet = _quiet_keys(new, params.keys() | rule_keys, len(steps))
        keys = params.keys() | (set(new) - quiet) | rule_keys
        depth = max([params.history_steps(), *(alert_rules.history_points(r) for r in rules)])
        if cached is None or cached.depth < depth:
            cached = RunWindows(project=project, depth=depth, loss=loss)
        if cached.params is not params:  # first batch here, or the project's detector parameters changed
            kinds = refractory_kinds(params)
            cached.refractory = refractory_state(store.last_flag_steps(run_id, kinds, steps[0]))
            cached.params = params
            cached.heads.clear()  # their size and keys follow the parameters
        for key in quiet & cached.series.keys():
            del cached.series[key]  # its window misses this batch now: read again when the key next matters
        series: dict[str, Points] = {}
        missing = []
        for key in keys:
            window = cached.series.get(key)
            added = new.get(key)
            if window is None or (len(window[0]) and window[0][-1] >= steps[0]):
                missing.append(key)
            elif added is None:
                series[key] = window
            else:
                series[key] = (np.concatenate([window[0], added[0]]), np.concatenate([window[1], added[1]]))
        if missing:
            rows, latest = store.scalar_windows(run_id, missing, steps[0], steps[-1], cached.depth)
            read = _from_rows(rows)
            for key in missing:
                series[key] = read.get(key, EMPTY)
                added = new.get(key)
                if not written and added is not None:  # the batch's steps all follow the stored ones
                    series[key] = (
                        np.concatenate([series[key][0], added[0]]),
                        np.concatenate([series[key][1], added[1]]),
                    )
                if latest.get(key, -1) > steps[-1]:
                    cached.series.pop(key, None)  # stored points after this batch: not the newest window
                    continue
                cached.series[key] = series[key]
        for key in keys:
            if key in cached.series:
                s, v = series[key]
                cached.series[key] = (s[-cached.depth :], v[-cached.depth :])
        self._update_heads(store, run_id, params, cached, new, written)
        history = History.from_arrays(_with_heads(series, cached.heads))
        assert cached.refractory is not None
        return self._judge(project, run_id, params, rules, history, steps, cached.refractory, cached.loss), cached

    @staticmethod
    def _update_heads(
        store: Store, run_id: str, params: FlagParams, cached: RunWindows, new: dict[str, Points], written: bool
    ) -> None:
        """Keep the first `head_points` points of each head key: read once, then filled from new batches."""
        size = params.head_points()
        wanted = params.head_keys()
        missing = sorted(key for key in wanted if key not in cached.heads)
        if missing:
            read = _from_rows(store.scalar_heads(run_id, missing, size))
            for key in missing:
                cached.heads[key] = read.get(key, EMPTY)
        for key in wanted:
            head = cached.heads[key]
            added = new.get(key)
            if len(head[0]) < size and added is not None and (key not in missing or not written):
                steps, values = _union(head, added)
                cached.heads[key] = (steps[:size], values[:size])

    def _judge(
        self,
        project: str,
        run_id: str,
        params: FlagParams,
        rules: Sequence[AlertRule],
        history: History,
        steps: list[int],
        refractory: dict[str, int],
        loss: str | None,
    ) -> Evaluation:
        """Flags and alerts at `steps`; `refractory` (the latest flagged steps) moves on with the flags."""
        flags = detect(history, steps, params, refractory, loss)
        out = Evaluation(flags=flags)
        if rules:
            self._fire(project, run_id, self.rule_states.evaluate(run_id, rules, history, steps, flags), out)
        return out

    def _fire(self, project: str, run_id: str, firings: Sequence[alert_rules.Firing], out: Evaluation) -> None:
        """Alerts of the firings outside their rule's cooldown (the ones stored before, and those of this batch)."""
        now = time.time()
        last: dict[int, float | None] = {}
        for firing in firings:
            rule: AlertRule = firing.rule
            if rule.id not in last:
                last[rule.id] = self.alerts.last_fired(rule.id, run_id)
            previous = last[rule.id]
            # No cooldown: every firing, also after an alert another process stamped a moment after `now`.
            if previous is not None and rule.cooldown_s > 0 and now - previous < rule.cooldown_s:
                continue
            webhook = "webhook" in rule.channels and rule.webhook_url is not None
            if webhook:
                out.webhooks[len(out.alerts)] = str(rule.webhook_url)
            out.alerts.append(
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
            last[rule.id] = now

    def stored(self, evaluation: Evaluation, alert_ids: Sequence[int | None]) -> None:
        """Hand the webhooks of the alerts just stored (not those stored before) to the dispatcher."""
        if self.dispatcher is None:
            return
        for index, url in evaluation.webhooks.items():
            alert_id = alert_ids[index]
            if alert_id is not None:
                self.dispatcher.submit(self.alerts.get_alert(alert_id), url)
