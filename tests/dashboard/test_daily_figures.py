"""Pure helpers of the daily-use dashboard: key explorer, readable rows, on/off-policy, NaN, alerts text."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mhpo_dashboard import figures
from mhpo_dashboard.api import key_chunks


def _series(steps: list[int], values: list[float]) -> dict:
    return {"step": steps, "value": values, "min": values, "max": values}


def test_key_groups_put_prefix_matches_first_then_substring_grouped_by_prefix() -> None:
    keys = ["grad/norm/layer_10", "grad/norm/layer_2", "eval/accuracy", "val/AR@100", "train/loss", "loss"]
    groups, total = figures.key_groups(keys, "")
    assert total == 6 and [g[0] for g in groups] == ["eval/", "grad/", "(no prefix)", "train/", "val/"]
    assert {p: shown for p, shown, _ in groups}["grad/"] == ["grad/norm/layer_2", "grad/norm/layer_10"]
    groups, total = figures.key_groups(keys, "LOSS")
    assert total == 2 and [k for _, shown, _ in groups for k in shown] == ["loss", "train/loss"]
    groups, total = figures.key_groups([f"grad/norm/layer_{i}" for i in range(5000)], "layer", limit=60)
    assert total == 5000 and groups == [("grad/", groups[0][1], 5000)] and len(groups[0][1]) == 60


@given(st.lists(st.text(alphabet="abc/_0123456789", min_size=1, max_size=40), max_size=3000))
def test_key_chunks_keep_every_key_in_order_and_stay_under_the_limits(keys: list[str]) -> None:
    chunks = key_chunks(keys, max_keys=500, max_chars=600)
    assert [k for c in chunks for k in c] == keys
    assert all(len(c) <= 500 and (len(c) == 1 or sum(len(k) + 1 for k in c) <= 600) for c in chunks if c)


def test_rows_have_titles_units_distinct_colours_and_hover_with_step_and_value() -> None:
    rows = [["ratio/mean", "ratio/p99"], ["hazard/zeta_p99"]]
    series = {k: _series([0, 1, 2], [0.1, 0.2, 0.3]) for r in rows for k in r}
    fig, trace_map = figures.timeseries_figure("Panel", rows, series)
    go.Figure(fig)
    assert fig["layout"]["yaxis"]["title"]["text"] == "log-ratio x"
    assert fig["layout"]["yaxis2"]["title"]["text"].startswith("hazard zeta")
    lines = [fig["data"][trace_map[k][0]] for r in rows for k in r]
    assert lines[0]["legendgrouptitle"]["text"].startswith("Log-ratio")
    assert len({t["line"]["color"] for t in lines}) == 3
    assert "step %{x}" in lines[0]["hovertemplate"] and "%{y" in lines[0]["hovertemplate"]


def test_a_constant_series_keeps_a_readable_range_and_a_one_step_series_is_a_dot() -> None:
    fig, trace_map = figures.timeseries_figure("P", [["train/lr"]], {"train/lr": _series([5], [1.3277909])})
    assert fig["data"][trace_map["train/lr"][0]]["mode"] == "lines+markers"
    lo, hi = fig["layout"]["yaxis"]["autorangeoptions"]["include"]
    assert lo < 1.3277909 - 0.01 and hi > 1.3277909 + 0.01
    varying = {"train/lr": _series(list(range(100)), [float(i) for i in range(100)])}
    fig, trace_map = figures.timeseries_figure("P", [["train/lr"]], varying)
    assert "autorangeoptions" not in fig["layout"]["yaxis"] and fig["data"][trace_map["train/lr"][0]]["mode"] == "lines"


def test_nan_steps_get_bands_and_an_isolated_point_gets_a_marker() -> None:
    values = [1.0] * 40 + [math.nan, 2.0, math.inf] + [1.0] * 40
    fig, trace_map = figures.timeseries_figure(
        "P", [["policy/entropy"]], {"policy/entropy": _series(list(range(len(values))), values)}
    )
    go.Figure(fig)
    assert fig["data"][trace_map["policy/entropy"][0]]["mode"] == "lines+markers"
    assert sorted(s["x0"] + 0.5 for s in fig["layout"]["shapes"] if s.get("name") == "nan") == [40, 42]


def test_flag_markers_sit_on_the_key_the_evidence_names_at_its_value() -> None:
    rows = [["hazard/zeta_mean"], ["hazard/zeta_p99"]]
    series = {
        "hazard/zeta_mean": _series([0, 1, 2], [1.0, 1.0, 1.0]),
        "hazard/zeta_p99": _series([0, 1, 2], [2.0, 9.0, 2.0]),
    }
    named = {
        "id": 1,
        "type": "flag",
        "kind": "hazard_spike",
        "step": 1,
        "severity": "critical",
        "evidence": {"signals": [{"key": "hazard/zeta_p99", "z": 9.0}]},
    }
    elsewhere = {**named, "id": 2, "evidence": {"values": {"policy/entropy": math.nan}}}
    anonymous = {**named, "id": 3, "step": 2, "evidence": {}}
    assert figures.flag_key(named) == "hazard/zeta_p99" and figures.flag_key(anonymous) is None
    fig, trace_map = figures.timeseries_figure("Hazard", rows, series, [named, elsewhere, anonymous])
    first, second = (fig["data"][i] for i in trace_map["__events__"])
    assert second["x"] == [1] and second["y"] == [9.0] and second["yaxis"] == "y2"
    assert first["x"] == [2] and first["y"] == [1.0]
    assert len([s for s in fig["layout"]["shapes"][1:] if s.get("name") != "nan"]) == 3


def test_on_policy_steps_from_the_update_index_or_an_exact_zero_log_ratio() -> None:
    by_index = {
        "train/update_index": _series([0, 1, 2, 3], [0.0, 1.0, 0.0, 1.0]),
        "ratio/min": _series([0, 1, 2, 3], [0.0, 0.0, 0.0, 0.0]),
    }
    assert figures.on_policy_steps(by_index) == {0, 2}
    by_ratio = {"ratio/min": _series([0, 1, 2], [0.0, -0.1, 0.0]), "ratio/max": _series([0, 1, 2], [0.0, 0.1, 0.1])}
    assert figures.on_policy_steps(by_ratio) == {0}
    bucket = {"train/update_index": {"step": [0, 10], "value": [0.5, 0.0], "min": [0.0, 0.0], "max": [1.0, 0.0]}}
    assert figures.on_policy_steps(bucket) == {10}
    kept = figures.off_policy_only(
        {**by_index, "ratio/mean": _series([0, 1, 2, 3], [0.0, 0.2, 0.0, 0.3])}, ["ratio/mean"], {0, 2}
    )
    assert kept["ratio/mean"] == _series([1, 3], [0.2, 0.3]) and kept["ratio/min"] == by_index["ratio/min"]


def test_wasserstein_leaves_out_the_steps_it_is_told_to_skip() -> None:
    hist = {
        "lo": -1.0,
        "hi": 1.0,
        "bins": 2,
        "step": [0, 1, 2],
        "counts": [[1, 0], [1, 0], [1, 0]],
        "underflow": [0, 0, 0],
        "overflow": [0, 0, 0],
    }
    other = {**hist, "counts": [[0, 1], [0, 1], [0, 1]]}
    steps, dists = figures.wasserstein_by_step(hist, other, skip={0, 2})
    assert steps == [1] and dists == [pytest.approx(1.0)]


def test_alert_conditions_read_as_words_and_times_as_utc() -> None:
    assert (
        figures.condition_text({"type": "threshold", "key": "hazard/zeta_p99", "op": ">", "value": 3.0, "for_steps": 5})
        == "hazard/zeta_p99 > 3 for 5 steps"
    )
    assert (
        figures.condition_text({"type": "spike", "key": "grad/norm", "direction": "up", "z": 6.0})
        == "grad/norm upward spike (robust z > 6)"
    )
    assert (
        figures.condition_text({"type": "flag", "kind": "*", "min_severity": "critical"})
        == "any flag of severity critical or worse"
    )
    assert figures.when(0.0) == "1970-01-01 00:00:00" and figures.when(None) == ""
    rows = figures.alert_rows(
        [
            {
                "id": 4,
                "created_at": 0.0,
                "rule_name": "r",
                "run_id": "abc",
                "step": 3,
                "severity": "warning",
                "message": "m",
                "acknowledged_at": None,
                "delivery_status": "none",
            }
        ],
        {"abc": "my-run"},
    )
    assert rows[0]["run"] == "[my-run](/runs/abc)" and rows[0]["acknowledged"] == "no" and rows[0]["id"] == 4


def test_run_facts_leave_out_a_loss_the_run_does_not_name() -> None:
    base = {"name": "r", "project": "p", "status": "running", "last_step": 3, "open_flags": 1}
    assert figures.run_facts({**base, "loss": None}) == "project p · status running · last step 3 · open flags 1"
    assert "loss mhpo" in figures.run_facts({**base, "loss": "mhpo"})
