"""Rule evaluation: running per-(run, rule) state, so each new point costs O(1) (O(log w) for a spike).

A scalar rule (threshold, spike) is edge-triggered: it fires at a step where its
condition holds and did not hold at the previous logged point, so a metric that stays
above a threshold fires once, not at every step. A flag rule fires on each matching flag.
The caller applies the cooldown (per rule and run, in wall-clock seconds).

`RuleStates` keeps, per (run, rule), what the next point needs: for a threshold the length
of the current streak of matching points (capped at `for_steps + 1`), for a spike the last
`window_steps` values with their finite ones kept sorted (`stats.robust_z`: median in O(1),
MAD in O(log w)) and whether the previous point spiked. A state
is used only when it summarises exactly the points before the batch (its last step is
the key's previous logged point); otherwise (first batch, a restart, an eviction, an
out-of-order batch, another writer) it is rebuilt once from the bounded history the
caller passes, so the firings never depend on the state. States are dropped least
recently used beyond a total of `max_cells` stored values.
"""

from __future__ import annotations

import bisect
import math
import operator
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mhpo_server.monitoring.detectors import Flag, History, json_number
from mhpo_server.monitoring.schemas import SEVERITY_RANK, AlertRule, FlagCondition, SpikeCondition, ThresholdCondition
from mhpo_server.monitoring.stats import robust_z

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class Firing:
    """One rule matching at one step, before the cooldown is applied."""

    rule: AlertRule
    step: int
    message: str
    evidence: dict[str, Any]


def history_points(rule: AlertRule) -> int:
    """How many logged points before a batch a rule's state is rebuilt from."""
    cond = rule.condition
    if isinstance(cond, ThresholdCondition):
        return cond.for_steps + 1
    if isinstance(cond, SpikeCondition):
        return cond.window_steps + 1
    return 0


@dataclass
class ThresholdState:
    last_step: int | None = None
    streak: int = 0  # matching points in a row up to last_step, capped at for_steps + 1


@dataclass
class SpikeState:
    last_step: int | None = None
    window: deque[float] = field(default_factory=deque)  # the last window_steps values, NaN included
    ordered: list[float] = field(default_factory=list)  # the finite values of `window`, sorted
    spiked: bool = False  # whether the point at last_step was a spike

    def push(self, value: float, window_steps: int) -> None:
        self.window.append(value)
        if math.isfinite(value):
            bisect.insort(self.ordered, value)
        if len(self.window) > window_steps:
            old = self.window.popleft()
            if math.isfinite(old):
                del self.ordered[bisect.bisect_left(self.ordered, old)]


def _spike_score(value: float, ordered: list[float], cond: SpikeCondition) -> tuple[bool, tuple[float, float, float]]:
    """Whether `value` spikes against the finite window values `ordered`, and its (z, baseline, scale)."""
    if not math.isfinite(value) or len(ordered) < cond.min_baseline:
        return False, (math.nan, math.nan, math.nan)
    z, centre, scale = robust_z(value, ordered, 1e-9, 1e-4)
    fired = {"up": z > cond.z, "down": z < -cond.z, "both": abs(z) > cond.z}[cond.direction]
    return fired, (z, centre, scale)


def _rebuild(
    cond: ThresholdCondition | SpikeCondition, steps: np.ndarray, values: np.ndarray
) -> ThresholdState | SpikeState:
    """The state after the given points (the key's last logged points, at least `history_points` of them or all)."""
    last = int(steps[-1]) if len(steps) else None
    if isinstance(cond, ThresholdCondition):
        test = OPS[cond.op]
        streak = 0
        for v in values[::-1][: cond.for_steps + 1].tolist():
            if not test(v, cond.value):
                break
            streak += 1
        return ThresholdState(last, streak)
    state = SpikeState(last)
    tail = values[-(cond.window_steps + 1) :].tolist()
    if tail:
        before = tail[:-1][-cond.window_steps :]
        state.spiked = _spike_score(tail[-1], sorted(v for v in before if math.isfinite(v)), cond)[0]
    for v in tail[-cond.window_steps :]:
        state.push(v, cond.window_steps)
    return state


def _scalar_firings(
    rule: AlertRule, state: ThresholdState | SpikeState, steps: np.ndarray, values: np.ndarray, fire_at: set[int]
) -> list[Firing]:
    """Advance `state` over the points (steps after its last step); firings at steps in `fire_at`."""
    cond = rule.condition
    out = []
    if isinstance(cond, ThresholdCondition):
        assert isinstance(state, ThresholdState)
        test, cap = OPS[cond.op], cond.for_steps + 1
        for step, value in zip(steps.tolist(), values.tolist(), strict=True):
            state.streak = min(state.streak + 1, cap) if test(value, cond.value) else 0
            state.last_step = step
            if state.streak != cond.for_steps or step not in fire_at:
                continue
            evidence: dict[str, Any] = {
                "key": cond.key,
                "value": json_number(value),
                "threshold": {"op": cond.op, "value": cond.value, "for_steps": cond.for_steps},
            }
            what = f"{cond.key} = {value:.4g} {cond.op} {cond.value:g}"
            if cond.for_steps > 1:
                what += f" for {cond.for_steps} steps"
            out.append(Firing(rule=rule, step=step, message=f"{rule.name}: {what} at step {step}", evidence=evidence))
        return out
    assert isinstance(cond, SpikeCondition) and isinstance(state, SpikeState)
    for step, value in zip(steps.tolist(), values.tolist(), strict=True):
        spiked, (z, centre, scale) = _spike_score(value, state.ordered, cond)
        edge = spiked and not state.spiked
        state.spiked = spiked
        state.push(value, cond.window_steps)
        state.last_step = step
        if not edge or step not in fire_at:
            continue
        evidence = {
            **{
                name: json_number(x) for name, x in (("value", value), ("baseline", centre), ("scale", scale), ("z", z))
            },
            "key": cond.key,
            "threshold": {"z": cond.z, "direction": cond.direction, "window_steps": cond.window_steps},
        }
        what = f"{cond.key} = {value:.4g} spiked (robust z = {z:.1f} vs baseline {centre:.4g})"
        out.append(Firing(rule=rule, step=step, message=f"{rule.name}: {what} at step {step}", evidence=evidence))
    return out


def _cells(state: ThresholdState | SpikeState) -> int:
    return 1 + len(state.window) if isinstance(state, SpikeState) else 1


class RuleStates:
    """Running state of the scalar rules per (run, rule), least recently used dropped beyond `max_cells` values."""

    def __init__(self, max_cells: int = 2_000_000) -> None:
        self.max_cells = max_cells
        self._states: OrderedDict[tuple[str, int], tuple[str, ThresholdState | SpikeState]] = OrderedDict()
        self._cells = 0
        self._lock = threading.Lock()

    def _take(self, run_id: str, rule: AlertRule, fingerprint: str) -> ThresholdState | SpikeState | None:
        with self._lock:
            found = self._states.pop((run_id, rule.id), None)
            if found is None:
                return None
            self._cells -= _cells(found[1])
            return found[1] if found[0] == fingerprint else None

    def _put(self, run_id: str, rule: AlertRule, fingerprint: str, state: ThresholdState | SpikeState) -> None:
        with self._lock:
            self._states[(run_id, rule.id)] = (fingerprint, state)
            self._cells += _cells(state)
            while self._cells > self.max_cells and len(self._states) > 1:
                _, (_, dropped) = self._states.popitem(last=False)
                self._cells -= _cells(dropped)

    def drop_run(self, run_id: str) -> None:
        with self._lock:
            for key in [k for k in self._states if k[0] == run_id]:
                self._cells -= _cells(self._states.pop(key)[1])

    def __len__(self) -> int:
        return len(self._states)

    def evaluate(
        self, run_id: str, rules: Iterable[AlertRule], history: History, steps: Sequence[int], flags: Sequence[Flag]
    ) -> list[Firing]:
        """Every (rule, step) match among the new `steps` and new `flags`, ordered by step.

        `history` holds, per key, at least `history_points(rule)` points before the first
        new step (or all there are) and every point up to the last new step.
        """
        fire_at = set(steps)
        first, last = min(fire_at), max(fire_at)
        out: list[Firing] = []
        for rule in rules:
            cond = rule.condition
            if isinstance(cond, FlagCondition):
                out.extend(_flag_firings(rule, flags))
                continue
            found = history.series(cond.key)
            if found is None:
                continue
            key_steps, key_values = found
            start = int(np.searchsorted(key_steps, first, side="left"))
            stop = int(np.searchsorted(key_steps, last, side="right"))
            if start == stop:
                continue
            previous = int(key_steps[start - 1]) if start else None
            fingerprint = cond.model_dump_json()
            state = self._take(run_id, rule, fingerprint)
            if state is None or state.last_step != previous:
                state = _rebuild(cond, key_steps[:start], key_values[:start])
            out.extend(_scalar_firings(rule, state, key_steps[start:stop], key_values[start:stop], fire_at))
            self._put(run_id, rule, fingerprint, state)
        return sorted(out, key=lambda f: (f.step, f.rule.id))


def _flag_firings(rule: AlertRule, flags: Iterable[Flag]) -> list[Firing]:
    cond = rule.condition
    assert isinstance(cond, FlagCondition)
    return [
        Firing(
            rule=rule,
            step=flag.step,
            message=f"{rule.name}: {flag.message} at step {flag.step}",
            evidence={"flag": flag.as_event()},
        )
        for flag in flags
        if cond.kind in ("*", flag.kind) and SEVERITY_RANK[flag.severity] >= SEVERITY_RANK[cond.min_severity]
    ]
