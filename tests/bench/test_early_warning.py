"""The corpus labels and the early-warning arithmetic, on small hand-made record lists (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.corpus import BY_NAME, REGIMES, CorpusRun, Labels, label, load_corpus, plan, rollouts_of, split_of
from bench.early_warning import (
    FLAG,
    THRESHOLD,
    Alarm,
    Judged,
    flag_alarms,
    rows_for,
    score,
    table,
    threshold_alarms,
)
from mhpo_server.monitoring import FlagParams


def make_records(
    entropy: list[float],
    degenerate: list[float] | None = None,
    truncated: list[float] | None = None,
    updates: int = 2,
    off_policy_entropy: float = 1.0,
    extra: dict[int, dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """`updates` records per rollout; the on-policy one carries `entropy[r]`, the others `off_policy_entropy`."""
    records = []
    for r, value in enumerate(entropy):
        for i in range(updates):
            step = r * updates + i
            scalars = {
                "train/rollout": float(r),
                "train/update_index": float(i),
                "policy/entropy": value if i == 0 else off_policy_entropy,
                "group/degenerate_frac": 0.25 if degenerate is None else degenerate[r],
                "ratio/clip_frac": 0.0,
                "policy/kl_k3": 0.0,
                "tokens/valid": 64.0,
            }
            if truncated is not None:
                scalars["policy/truncated_frac"] = truncated[r]
            scalars.update((extra or {}).get(step, {}))
            records.append({"step": step, "scalars": scalars})
    return records


def make_run(records: list[dict[str, Any]], name: str = "r", split: str = "tune") -> CorpusRun:
    rollouts = rollouts_of(records)
    return CorpusRun(name, 0, split, Path(f"{name}.jsonl"), [], records, label(rollouts), rollouts)


# ---- labels -------------------------------------------------------------------------------


def test_collapse_is_five_rollouts_under_a_quarter_of_the_first_three():
    entropy = [1.0, 1.2, 0.8, 0.5, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    labels = label(rollouts_of(make_records(entropy)))
    assert labels == Labels(collapse=4, stopped=None, truncation=None)
    assert labels.kind == "collapse"
    assert labels.rollout == 4


def test_collapse_needs_five_in_a_row_strictly_under_the_quarter():
    # 0.25 is not under 25 % of a start of 1.0; the run of 0.2s after it is only 4 long
    entropy = [1.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2, 0.25, 0.2, 0.2, 0.2, 0.2]
    assert label(rollouts_of(make_records(entropy))).collapse is None
    assert label(rollouts_of(make_records([*entropy, 0.1]))).collapse == 8


def test_collapse_reads_the_on_policy_update_only():
    # every off-policy update reports a collapsed entropy; the on-policy ones do not
    records = make_records([1.0] * 12, off_policy_entropy=0.01, updates=4)
    assert label(rollouts_of(records)).kind == "healthy"


def test_the_first_record_stands_for_a_rollout_without_update_index():
    records = make_records([1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1], off_policy_entropy=1.0)
    for r in records:
        del r["scalars"]["train/update_index"]
    rollouts = rollouts_of(list(reversed(records)))  # order of the records does not matter
    assert [r.first_step for r in rollouts] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert [r.last_step for r in rollouts] == [1, 3, 5, 7, 9, 11, 13, 15]
    assert label(rollouts).collapse == 3


def test_no_collapse_label_before_three_rollouts():
    assert label(rollouts_of(make_records([1.0, 0.0]))).collapse is None


def test_stopped_is_ten_rollouts_at_or_above_ninety_percent_degenerate():
    degenerate = [0.5] * 5 + [0.9] * 9 + [0.5] + [1.0] * 10
    labels = label(rollouts_of(make_records([1.0] * len(degenerate), degenerate)))
    assert labels == Labels(collapse=None, stopped=15, truncation=None)
    assert labels.kind == "stopped"
    nine = label(rollouts_of(make_records([1.0] * 9, [1.0] * 9)))
    assert nine.stopped is None


def test_a_run_both_collapsed_and_stopped_is_labelled_by_the_earlier_state():
    entropy = [1.0, 1.0, 1.0] + [0.1] * 15
    degenerate = [0.0] * 5 + [1.0] * 13
    labels = label(rollouts_of(make_records(entropy, degenerate)))
    assert (labels.collapse, labels.stopped, labels.kind, labels.rollout) == (3, 5, "collapse", 3)
    tie = Labels(collapse=4, stopped=4, truncation=None)
    assert tie.kind == "collapse"
    assert Labels(collapse=9, stopped=4, truncation=None).kind == "stopped"


def test_truncation_is_five_rollouts_with_most_completions_cut():
    truncated = [0.0, 0.6, 0.6, 0.6, 0.6, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9]
    labels = label(rollouts_of(make_records([1.0] * len(truncated), truncated=truncated)))
    assert labels.truncation == 6
    assert labels.kind == "healthy"  # informational: not a label kind
    assert label(rollouts_of(make_records([1.0] * 10))).truncation is None  # key absent


def test_the_split_is_fixed_by_regime_and_seed():
    splits = {(r.name, s): split_of(r, s) for r in REGIMES for s in (0, 1, 2)}
    assert all(splits[(r.name, 2)] == "held" for r in REGIMES)
    held_whole = [r.name for r in REGIMES if r.held]
    assert len(held_whole) >= 3
    assert all(splits[(n, s)] == "held" for n in held_whole for s in (0, 1))
    assert splits[("add_mhpo", 0)] == splits[("lr_ramp", 1)] == "tune"
    assert len(REGIMES) * 3 >= 42
    quick = plan(["lr_ramp", "unlearnable"], None, quick=True)
    assert [(p.regime.name, p.seed, p.rollouts) for p in quick] == [
        ("lr_ramp", 0, BY_NAME["lr_ramp"].rollouts // 2),
        ("unlearnable", 0, BY_NAME["unlearnable"].rollouts // 2),
    ]


def test_load_corpus_reads_the_manifest_s_runs_of_the_splits_asked(tmp_path: Path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    entries = []
    for name, split, entropy in (("a", "tune", [1.0] * 3 + [0.1] * 5), ("b", "held", [1.0] * 8)):
        lines = [json.dumps({**r, "time": 0.0, "histograms": {"psi": {}}}) for r in make_records(entropy)]
        (runs_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        entries.append(
            {"regime": name, "seed": 1, "split": split, "command": ["mhpo", "train"], "path": f"runs/{name}.jsonl"}
        )
    (tmp_path / "manifest.json").write_text(json.dumps({"runs": entries}))
    tune = load_corpus(tmp_path, ["tune"])
    assert [(r.name, r.labels.kind, r.labels.collapse) for r in tune] == [("a s1", "collapse", 3)]
    assert set(tune[0].records[0]) == {"step", "scalars"}
    assert [r.name for r in load_corpus(tmp_path)] == ["a s1", "b s1"]
    with pytest.raises(FileNotFoundError, match=r"bench/corpus\.py --out"):
        load_corpus(tmp_path / "missing")
    command = plan(["mul_cispo"], [2], quick=False)[0].command(tmp_path / "data", tmp_path / "m.jsonl")
    assert command[command.index("--data") + 1] == str(tmp_path / "data" / "multiply.jsonl")
    assert command[command.index("--seed") + 1] == "2"


# ---- report arithmetic --------------------------------------------------------------------


def row(name: str):
    return next(
        r for r in rows_for(["collapse", "entropy_surge", "no_signal", "trust_region"]) if r.name.strip() == name
    )


def test_false_warnings_per_thousand_healthy_steps_count_flags_of_healthy_runs_only():
    healthy = make_run(make_records([1.0] * 50), "healthy")  # 100 optimizer steps
    collapsed = make_run(make_records([1.0, 1.0, 1.0] + [0.1] * 10), "collapsed")
    judged = [
        Judged(
            healthy,
            [Alarm(10, "entropy_surge", FLAG), Alarm(40, "trust_region", FLAG), Alarm(41, "kl_k3>0.1", THRESHOLD)],
        ),
        Judged(collapsed, [Alarm(1, "trust_region", FLAG)]),  # not healthy: never a false warning
    ]
    flags = score(row("MHPO flags"), judged)
    assert (flags.healthy_runs, flags.healthy_steps) == (1, 100)
    assert flags.false_per_1000 == pytest.approx(20.0)
    assert flags.false_alarms == {"entropy_surge": 1, "trust_region": 1}
    kl = score(row("threshold kl_k3>0.1"), judged)
    assert kl.false_per_1000 == pytest.approx(10.0)
    assert score(row("any threshold"), judged).false_alarms == {"kl_k3>0.1": 1}


def test_collapse_recall_allows_one_rollout_after_the_label_and_ignores_entropy_surge():
    entropy = [1.0, 1.0, 1.0] + [0.9] * 7 + [0.1] * 8  # label rollout 10: steps 20-21; rollout 11 ends at 23
    runs = [make_run(make_records(entropy), f"c{i}") for i in range(4)]
    assert all(r.labels.collapse == 10 for r in runs)
    judged = [
        Judged(
            runs[0], [Alarm(5, "trust_region", FLAG), Alarm(22, "collapse", FLAG)]
        ),  # early: lead 15 steps, 8 rollouts
        Judged(runs[1], [Alarm(23, "collapse", FLAG)]),  # the last step of rollout 11: in time, lead -3 (-1)
        Judged(runs[2], [Alarm(24, "collapse", FLAG)]),  # rollout 12: late, flagged at all
        Judged(runs[3], [Alarm(2, "entropy_surge", FLAG)]),  # a surge is no collapse detection
    ]
    recall = score(row("MHPO flags"), judged).collapse
    assert recall is not None
    f = recall.figures()
    assert (f["labelled"], f["in_time"], f["flagged_at_all"]) == (4, 2, 3)
    assert sorted(recall.leads_steps) == [-3, 15]
    assert sorted(recall.leads_rollouts) == [-1, 8]
    assert f["median_lead_steps"] == 6 and f["median_lead_rollouts"] == 3.5
    assert f["missed"] == ["c2 s0", "c3 s0"]
    assert score(row("entropy_surge"), judged).collapse is None
    only_collapse = score(row("collapse"), judged).collapse
    assert only_collapse is not None and (only_collapse.in_time, only_collapse.flagged) == (2, 3)
    assert score(row("collapse"), judged).stopped is None


def test_stopped_recall_is_no_signal_within_ten_rollouts():
    degenerate = [0.2] * 5 + [1.0] * 20  # label rollout 5 (step 10); rollout 15 ends at step 31
    runs = [make_run(make_records([1.0] * 25, degenerate), f"s{i}") for i in range(3)]
    assert all(r.labels.stopped == 5 for r in runs)
    judged = [
        Judged(runs[0], [Alarm(31, "no_signal", FLAG)]),
        Judged(runs[1], [Alarm(32, "no_signal", FLAG), Alarm(12, "collapse", FLAG)]),
        Judged(runs[2], [Alarm(10, "zero_std>0.9", THRESHOLD)]),
    ]
    stopped = score(row("MHPO flags"), judged).stopped
    assert stopped is not None
    assert (stopped.labelled, stopped.in_time, stopped.flagged) == (3, 1, 2)
    assert stopped.leads_steps == [10 - 31] and stopped.leads_rollouts == [5 - 15]
    zero_std = score(row("threshold zero_std>0.9"), judged)
    assert zero_std.collapse is None and zero_std.stopped is not None
    assert (zero_std.stopped.in_time, zero_std.stopped.leads_steps) == (1, [0])
    assert score(row("threshold entropy<50%"), judged).stopped is None


def test_threshold_alarms_count_each_crossing_from_the_safe_side_once():
    entropy = [1.0, 1.0, 1.0, 0.4, 0.4, 0.6, 0.3]  # start 1.0: under 0.5 at rollouts 3-4 and 6
    extra = {
        0: {"ratio/clip_frac": 0.3},
        1: {"ratio/clip_frac": 0.3},
        2: {"ratio/clip_frac": 0.1},
        3: {"ratio/clip_frac": 0.25},
    }
    run = make_run(make_records(entropy, off_policy_entropy=0.45, extra=extra))
    alarms = threshold_alarms(run)
    steps = {
        name: [a.step for a in alarms if a.source == name] for name in ("entropy<50%", "clip_frac>0.2", "kl_k3>0.1")
    }
    # every record is judged: the off-policy entropy 0.45 is under 0.5 at steps 1, 3, 5...
    assert steps["entropy<50%"][:2] == [1, 3]
    assert steps["clip_frac>0.2"] == [0, 3]
    assert steps["kl_k3>0.1"] == []
    assert all(a.family == THRESHOLD for a in alarms)


def test_flag_alarms_are_the_detectors_warnings_with_the_params_given():
    extra = {30: {"policy/kl_k3": math.nan}}
    run = make_run(make_records([1.0] * 40, extra=extra))
    alarms = flag_alarms(run, FlagParams())
    assert Alarm(30, "non_finite", FLAG) in alarms
    off = flag_alarms(run, FlagParams().merged({"non_finite": {"enabled": False}}))
    assert all(a.source != "non_finite" for a in off)


def test_table_prints_rates_kinds_and_leads():
    healthy = make_run(make_records([1.0] * 50), "healthy")
    collapsed = make_run(make_records([1.0, 1.0, 1.0] + [0.9] * 7 + [0.1] * 8), "collapsed")
    judged = [Judged(healthy, [Alarm(3, "trust_region", FLAG)]), Judged(collapsed, [Alarm(5, "trust_region", FLAG)])]
    text = table([(row("MHPO flags"), score(row("MHPO flags"), judged))])
    assert "| MHPO flags | 10.00 (1: trust_region 1) | 1/1 | 1/1 | +15 (+8) | 0/0 | 0/0 | - |" in text
