"""Early warning on a labelled corpus of real `mhpo train` runs: the flags against the thresholds a TRL/verl user sets.

Runs the service's detectors (`mhpo_server.monitoring.detect`, the code the ingest listener
runs; batching does not change its flags) on each run of the corpus `bench/corpus.py` makes,
all of a run's optimizer steps at once, and scores the warning and critical flags against the
runs' labels (from their outcomes, never from a detector: see `bench/corpus.py`):

    python bench/early_warning.py --corpus DIR                 # tune and held splits (makes DIR if missing)
    python bench/early_warning.py --corpus DIR --split tune    # the only split to choose thresholds on
    python bench/early_warning.py --corpus DIR --params p.json --json out.json --verbose

`--params FILE` is a JSON object of `FlagParams` overrides (nested, partial: applied with
`FlagParams().merged`), e.g. `{"collapse": {"forecast": {"z": 5.0}}}`. `--verbose` lists per run its labels
and the first alarm of each kind. `--json FILE` writes every figure below and the per-run list.

Per split (`tune`, `held`), per row (the MHPO flags, each flag kind, each threshold alarm):
- false warnings per 1,000 healthy steps: alarms (warning/critical flags of any kind, or
  threshold crossings) in the runs labelled healthy, per 1,000 of their optimizer steps, and
  which kinds they were;
- collapse recall: runs with a collapse label flagged, by a kind other than `entropy_surge`,
  no later than one rollout after the label rollout (at a step <= the last optimizer step of
  rollout label + 1); "flagged at all": such a flag anywhere in the run;
- stopped recall: runs with a stopped label flagged `no_signal` no later than 10 rollouts
  after the label rollout; "flagged at all" likewise;
- median lead: label step - the first qualifying alarm's step, over the runs flagged in
  time, in optimizer steps and in rollouts (> 0: before the label).
A run labelled both collapse and stopped counts in both recalls; alarms in runs that are not
healthy are never counted as false. A healthy run whose completions were mostly truncated
(the informational truncation label) stays healthy: its flags count as false; the header
says how many such runs there are.

The threshold alarms a TRL/verl user sets (each crossing from the safe side counts once;
every one of them is a false alarm on a healthy run): entropy under 50 % of its start (the
mean of the first 3 rollouts' on-policy entropy), clip fraction (`ratio/clip_frac`) over
0.2 and KL k3 (`policy/kl_k3`) over 0.1 count as collapse detections; the degenerate-group
fraction (`group/degenerate_frac`, TRL's `frac_reward_zero_std`) over 0.9 as a stopped
detection. The row "any threshold" is all four watched together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.corpus import CorpusRun, generate, load_corpus
from mhpo.trainer.config import TrainerConfig
from mhpo_server.monitoring import FlagParams, History, detect

ALARM = ("warning", "critical")
COLLAPSE_GRACE = 1  # rollouts after the label rollout a collapse detection may come
STOPPED_GRACE = 10  # likewise for a stopped detection
NOT_COLLAPSE = "entropy_surge"  # a surge is not a collapse detection
STOPPED_KIND = "no_signal"
FLAG, THRESHOLD = "flag", "threshold"


@dataclass(frozen=True)
class Alarm:
    """A warning/critical flag (`source` = its kind) or a threshold crossing (`source` = its name)."""

    step: int
    source: str
    family: str  # FLAG or THRESHOLD


@dataclass(frozen=True)
class Threshold:
    name: str
    key: str
    above: bool  # alarm when the value is above `level` (else below)
    level: float
    relative: bool = False  # `level` is a share of the run's start (mean of the first 3 rollouts)
    detects: str = "collapse"  # the label a crossing counts for


THRESHOLDS = (
    Threshold("entropy<50%", "policy/entropy", above=False, level=0.5, relative=True),
    Threshold("clip_frac>0.2", "ratio/clip_frac", above=True, level=0.2),
    Threshold("kl_k3>0.1", "policy/kl_k3", above=True, level=0.1),
    Threshold("zero_std>0.9", "group/degenerate_frac", above=True, level=0.9, detects="stopped"),
)
THRESHOLD_DETECTS = {t.name: t.detects for t in THRESHOLDS}


def run_loss(command: Sequence[str]) -> str:
    """The loss a train command trains with (`--loss`, else the trainer's default), as the run records it."""
    flags = list(command)
    return flags[flags.index("--loss") + 1] if "--loss" in flags else TrainerConfig.loss


def flag_alarms(run: CorpusRun, params: FlagParams) -> list[Alarm]:
    """The warning/critical flags of `detect` on the run's whole record stream."""
    rows = ((key, r["step"], value) for r in run.records for key, value in r["scalars"].items())
    steps = [r["step"] for r in run.records]
    flags = detect(History.from_rows(rows), steps, params, loss=run_loss(run.command))
    return [Alarm(f.step, f.kind, FLAG) for f in flags if f.severity in ALARM]


def threshold_alarms(run: CorpusRun) -> list[Alarm]:
    """Each threshold's crossings from the safe side, in step order (records lacking the key keep the state)."""
    early = [r.entropy for r in run.rollouts[:3] if r.entropy is not None]
    out = []
    for t in THRESHOLDS:
        if t.relative and not early:
            continue
        level = t.level * statistics.fmean(early) if t.relative else t.level
        unsafe = False
        for record in sorted(run.records, key=lambda r: r["step"]):
            value = record["scalars"].get(t.key)
            if value is None:
                continue
            now = value > level if t.above else value < level
            if now and not unsafe:
                out.append(Alarm(record["step"], t.name, THRESHOLD))
            unsafe = now
    return out


@dataclass
class Judged:
    """A run and its alarms (flags and threshold crossings)."""

    run: CorpusRun
    alarms: list[Alarm]


@dataclass(frozen=True)
class Row:
    """One line of the report: the alarms it counts, and which of them detect a collapse or a stop."""

    name: str
    counts: Callable[[Alarm], bool]
    collapse: Callable[[Alarm], bool] | None  # None: this row does not claim to detect collapses
    stopped: Callable[[Alarm], bool] | None


def rows_for(kinds: Iterable[str]) -> list[Row]:
    """The MHPO flags as a whole, then each flag kind in `kinds`, then each threshold and all four together."""

    def is_flag(a: Alarm) -> bool:
        return a.family == FLAG

    rows = [
        Row(
            "MHPO flags",
            is_flag,
            lambda a: is_flag(a) and a.source != NOT_COLLAPSE,
            lambda a: is_flag(a) and a.source == STOPPED_KIND,
        )
    ]
    for kind in sorted(kinds):

        def of_kind(a: Alarm, kind: str = kind) -> bool:
            return is_flag(a) and a.source == kind

        rows.append(
            Row(
                f"  {kind}",
                of_kind,
                None if kind == NOT_COLLAPSE else of_kind,
                of_kind if kind == STOPPED_KIND else None,
            )
        )
    for t in THRESHOLDS:

        def crossing(a: Alarm, name: str = t.name) -> bool:
            return a.family == THRESHOLD and a.source == name

        rows.append(
            Row(
                f"threshold {t.name}",
                crossing,
                crossing if t.detects == "collapse" else None,
                crossing if t.detects == "stopped" else None,
            )
        )
    rows.append(
        Row(
            "any threshold",
            lambda a: a.family == THRESHOLD,
            lambda a: a.family == THRESHOLD and THRESHOLD_DETECTS[a.source] == "collapse",
            lambda a: a.family == THRESHOLD and THRESHOLD_DETECTS[a.source] == "stopped",
        )
    )
    return rows


@dataclass
class Recall:
    """Detections of one label by one row: runs labelled, flagged in time, flagged at all, leads, missed runs."""

    labelled: int = 0
    in_time: int = 0
    flagged: int = 0
    leads_steps: list[int] = field(default_factory=list)
    leads_rollouts: list[int] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)

    def add(self, run: CorpusRun, label_rollout: int, grace: int, alarms: Sequence[Alarm]) -> None:
        """Count `run`, whose state starts at `label_rollout`, against its qualifying `alarms`."""
        self.labelled += 1
        if not alarms:
            self.missed.append(run.name)
            return
        self.flagged += 1
        first = min(a.step for a in alarms)
        if first > run.last_step(label_rollout + grace):
            self.missed.append(run.name)
            return
        self.in_time += 1
        self.leads_steps.append(run.first_step(label_rollout) - first)
        self.leads_rollouts.append(label_rollout - run.rollout_at(first))

    def figures(self) -> dict[str, Any]:
        return {
            "labelled": self.labelled,
            "in_time": self.in_time,
            "flagged_at_all": self.flagged,
            "median_lead_steps": statistics.median(self.leads_steps) if self.leads_steps else None,
            "median_lead_rollouts": statistics.median(self.leads_rollouts) if self.leads_rollouts else None,
            "missed": self.missed,
        }


@dataclass
class Score:
    """One row's figures on one split."""

    healthy_runs: int = 0
    healthy_steps: int = 0
    false_alarms: Counter[str] = field(default_factory=Counter)
    collapse: Recall | None = None
    stopped: Recall | None = None

    @property
    def false_per_1000(self) -> float | None:
        return 1000.0 * sum(self.false_alarms.values()) / self.healthy_steps if self.healthy_steps else None

    def figures(self) -> dict[str, Any]:
        return {
            "healthy_runs": self.healthy_runs,
            "healthy_steps": self.healthy_steps,
            "false_alarms": sum(self.false_alarms.values()),
            "false_per_1000_healthy_steps": self.false_per_1000,
            "false_alarm_kinds": dict(self.false_alarms),
            "collapse": None if self.collapse is None else self.collapse.figures(),
            "stopped": None if self.stopped is None else self.stopped.figures(),
        }


def score(row: Row, judged: Sequence[Judged]) -> Score:
    """`row`'s false alarms on the healthy runs of `judged` and its recall of their collapse and stopped labels."""
    out = Score(
        collapse=None if row.collapse is None else Recall(),
        stopped=None if row.stopped is None else Recall(),
    )
    for j in judged:
        labels = j.run.labels
        if labels.kind == "healthy":
            out.healthy_runs += 1
            out.healthy_steps += len(j.run.records)
            out.false_alarms.update(a.source for a in j.alarms if row.counts(a))
        if labels.collapse is not None and out.collapse is not None and row.collapse is not None:
            out.collapse.add(j.run, labels.collapse, COLLAPSE_GRACE, [a for a in j.alarms if row.collapse(a)])
        if labels.stopped is not None and out.stopped is not None and row.stopped is not None:
            out.stopped.add(j.run, labels.stopped, STOPPED_GRACE, [a for a in j.alarms if row.stopped(a)])
    return out


def judge(runs: Sequence[CorpusRun], params: FlagParams) -> list[Judged]:
    return [Judged(run, sorted(flag_alarms(run, params) + threshold_alarms(run), key=lambda a: a.step)) for run in runs]


def _lead(recall: Recall) -> str:
    f = recall.figures()
    if f["median_lead_steps"] is None:
        return "-"
    return f"{f['median_lead_steps']:+g} ({f['median_lead_rollouts']:+g})"


def _recall_cells(recall: Recall | None) -> list[str]:
    if recall is None:
        return ["-", "-", "-"]
    return [f"{recall.in_time}/{recall.labelled}", f"{recall.flagged}/{recall.labelled}", _lead(recall)]


def table(scores: Sequence[tuple[Row, Score]]) -> str:
    """The split's figures as a markdown table, one line per row."""
    header = [
        "",
        "false warnings / 1,000 healthy steps",
        "collapse: in time",
        "at all",
        "median lead, steps (rollouts)",
        "stopped: in time",
        "at all",
        "median lead, steps (rollouts)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, s in scores:
        rate = s.false_per_1000
        kinds = ", ".join(f"{k} {n}" for k, n in s.false_alarms.most_common())
        false = "-" if rate is None else f"{rate:.2f} ({sum(s.false_alarms.values())}{': ' + kinds if kinds else ''})"
        cells = [row.name, false, *_recall_cells(s.collapse), *_recall_cells(s.stopped)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_lines(judged: Sequence[Judged]) -> list[str]:
    """Per run: its labels and the first alarm of each kind, `kind@step (rollout)`."""
    lines = []
    for j in judged:
        labels = j.run.labels
        states = [
            f"{kind} r{at} (step {j.run.first_step(at)})"
            for kind in ("collapse", "stopped", "truncation")
            if (at := getattr(labels, kind)) is not None
        ]
        first: dict[str, int] = {}
        for a in j.alarms:
            first.setdefault(a.source, a.step)
        alarms = ", ".join(f"{k}@{s} (r{j.run.rollout_at(s)})" for k, s in sorted(first.items(), key=lambda kv: kv[1]))
        if labels.mismatch:
            states.append("mismatch (stale sampler)")
        lines.append(
            f"{j.run.split:<5} {j.run.name:<24} {len(j.run.records):>4} steps  {', '.join(states) or 'healthy'}"
            f"  | {alarms or 'no alarm'}"
        )
    return lines


def report(judged: Sequence[Judged], splits: Sequence[str], verbose: bool = False) -> dict[str, Any]:
    """Print the tables per split (and per run with `verbose`); the figures, as `--json` writes them."""
    kinds = sorted({a.source for j in judged for a in j.alarms if a.family == FLAG})
    rows = rows_for(kinds)
    figures: dict[str, Any] = {}
    for split in splits:
        part = [j for j in judged if j.run.split == split]
        labels = Counter(j.run.labels.kind for j in part)
        both = sum(1 for j in part if j.run.labels.collapse is not None and j.run.labels.stopped is not None)
        scores = [(row, score(row, part)) for row in rows]
        healthy_steps = scores[0][1].healthy_steps
        truncated = sum(1 for j in part if j.run.labels.kind == "healthy" and j.run.labels.truncation is not None)
        print(
            f"\n## {split}: {len(part)} runs: {labels['healthy']} healthy ({healthy_steps:,} optimizer steps; "
            f"{truncated} of them truncated), {sum(1 for j in part if j.run.labels.collapse is not None)} collapse, "
            f"{sum(1 for j in part if j.run.labels.stopped is not None)} stopped ({both} both), "
            f"{labels['mismatch']} mismatch (a stale sampler: not counted as healthy)\n"
        )
        print(table(scores))
        figures[split] = {
            "runs": len(part),
            "labels": dict(labels),
            "healthy_truncated": truncated,
            "rows": {row.name.strip(): s.figures() for row, s in scores},
        }
    if verbose:
        print("\nper run: labels | first alarm of each kind, kind@step (rollout)")
        print("\n".join(run_lines([j for j in judged if j.run.split in splits])))
    figures["runs"] = [
        {
            "regime": j.run.regime,
            "seed": j.run.seed,
            "split": j.run.split,
            "optimizer_steps": len(j.run.records),
            "label": j.run.labels.kind,
            "labels": {
                "collapse": j.run.labels.collapse,
                "stopped": j.run.labels.stopped,
                "truncation": j.run.labels.truncation,
            },
            "alarms": [{"step": a.step, "source": a.source, "family": a.family} for a in j.alarms],
        }
        for j in judged
        if j.run.split in splits
    ]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--corpus", required=True, type=Path, help="corpus directory (made with bench/corpus.py if missing)"
    )
    parser.add_argument("--split", choices=("tune", "held", "all"), default="all", help="which split(s) to report")
    parser.add_argument("--params", type=Path, help="JSON file of FlagParams overrides")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--verbose", action="store_true", help="per run: its labels and the first alarm of each kind")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once when the corpus is made here")
    args = parser.parse_args()
    if not (args.corpus / "manifest.json").exists():
        generate(args.corpus, jobs=args.jobs)
    overrides = json.loads(args.params.read_text()) if args.params else None
    try:
        params = FlagParams().merged(overrides)
    except ValidationError as exc:
        raise SystemExit(f"--params {args.params}: not valid FlagParams overrides; fix these fields:\n{exc}") from exc
    splits = ("tune", "held") if args.split == "all" else (args.split,)
    t0 = time.monotonic()
    runs = load_corpus(args.corpus, splits)
    judged = judge(runs, params)
    print(
        f"{len(runs)} runs of {args.corpus} judged in {time.monotonic() - t0:.1f} s; params overrides: {overrides or 'none'}"
    )
    figures = report(judged, splits, args.verbose)
    if args.json:
        args.json.write_text(json.dumps({"corpus": str(args.corpus), "params": overrides, **figures}, indent=1) + "\n")


if __name__ == "__main__":
    main()
