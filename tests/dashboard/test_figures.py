"""Pure figure and table builders, on plain C7 payloads (no server, no browser)."""

from __future__ import annotations

import json
import math

import numpy as np
import plotly.graph_objects as go
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mhpo import curves
from mhpo_dashboard import figures


def _hist(
    columns: list[list[int]],
    steps: list[int] | None = None,
    lo: float = -2.0,
    hi: float = 2.0,
    under: list[int] | None = None,
    over: list[int] | None = None,
) -> dict:
    n = len(columns)
    return {
        "key": "log_ratio",
        "lo": lo,
        "hi": hi,
        "bins": len(columns[0]),
        "step": steps or list(range(n)),
        "step_end": steps or list(range(n)),
        "counts": columns,
        "underflow": under or [0] * n,
        "overflow": over or [0] * n,
        "min": [lo] * n,
        "max": [hi] * n,
        "sum": [0.0] * n,
        "sumsq": [0.0] * n,
    }


def valid(fig: dict) -> dict:
    """The figure dict, after Plotly itself validated every attribute of it."""
    go.Figure(fig)
    return fig


def _series(steps: list[int], values: list[float]) -> dict:
    return {"step": steps, "value": values, "min": values, "max": values}


def test_heatmap_columns_are_log_shares_of_all_values_with_gaps_for_empty_bins() -> None:
    steps, z = figures.heatmap_columns(_hist([[0, 10, 80], [5, 5, 0]], steps=[3, 9], under=[10, 0], over=[0, 10]))
    assert steps == [3, 9]
    assert z[0][0] is None and z[1][2] is None
    assert z[0][1] == pytest.approx(math.log10(10 / 100), abs=1e-4)
    assert z[0][2] == pytest.approx(math.log10(80 / 100), abs=1e-4)
    assert z[1][0] == pytest.approx(math.log10(5 / 20), abs=1e-4)


def test_heatmap_figure_is_transposed_so_new_steps_append_as_rows() -> None:
    fig = valid(figures.heatmap_figure(_hist([[1, 2, 3, 4]] * 5), selected_step=2))
    trace = fig["data"][0]
    assert trace["type"] == "heatmap" and trace["transpose"] is True
    assert trace["x"] == [0, 1, 2, 3, 4] and len(trace["z"]) == 5 and len(trace["y"]) == 4
    assert trace["zmax"] == 0 and trace["zmin"] == figures.HEATMAP_LOG_FLOOR
    assert fig["layout"]["shapes"][figures.SELECTION_SHAPE]["x0"] == 2


def test_heatmap_zooms_to_the_bins_in_use() -> None:
    hist = _hist([[0] * 30 + [1, 1, 1, 1] + [0] * 30])
    assert figures.occupied_bins(hist) == [30, 33]
    assert figures.occupied_bins(hist, known=[10, 31]) == [10, 33]
    lo, hi = figures.occupied_range(hist, [30, 33])
    assert lo == pytest.approx(-2 + 26 * 4 / 64) and hi == pytest.approx(-2 + 38 * 4 / 64)
    assert figures.occupied_range(hist, None) == [-2.0, 2.0]


def test_panel_rows_keep_logged_keys_and_expand_prefixes() -> None:
    rows = figures.panel_rows("gradients", ["grad/norm", "grad/norm/mlp", "grad/norm/attention", "grad/vanish_frac"])
    assert rows == [["grad/norm", "grad/norm/attention", "grad/norm/mlp"], ["grad/vanish_frac"]]
    assert figures.panel_rows("hazard", ["policy/entropy"]) == []


@pytest.mark.parametrize("downsampled", [False, True])
def test_extending_a_panel_equals_building_it_from_all_points(downsampled: bool) -> None:
    rows = [["hazard/zeta_mean", "hazard/zeta_p99"], ["hazard/survival_mean"]]
    keys = [k for r in rows for k in r]
    full = {k: _series(list(range(10)), [float(i * (j + 1)) for i in range(10)]) for j, k in enumerate(keys)}
    head = {k: {f: v[:6] for f, v in s.items()} for k, s in full.items()}
    tail = {k: {f: v[6:] for f, v in s.items()} for k, s in full.items()}
    grown, trace_map = figures.timeseries_figure("Hazard", rows, head, downsampled=downsampled)
    expected, _ = figures.timeseries_figure("Hazard", rows, full, downsampled=downsampled)
    valid(expected)
    for index, (xs, ys) in figures.series_extension(trace_map, tail).items():
        grown["data"][index]["x"] += xs
        grown["data"][index]["y"] += ys
    assert grown == expected
    assert len(trace_map) == len(keys) + 2 and all(len(trace_map[k]) == (3 if downsampled else 1) for k in keys)


def test_timeseries_figure_marks_flags_and_keeps_nan_as_gaps() -> None:
    events = [
        {
            "id": 1,
            "type": "flag",
            "kind": "hazard_spike",
            "step": 3,
            "severity": "critical",
            "detector": "spike",
            "message": "zeta p99 far above its baseline",
            "evidence": {},
        }
    ]
    fig, trace_map = figures.timeseries_figure(
        "Hazard", [["hazard/zeta_p99"]], {"hazard/zeta_p99": _series([0, 1, 2, 3], [1.0, math.nan, 1.0, 9.0])}, events
    )
    valid(fig)
    assert fig["data"][trace_map["hazard/zeta_p99"][0]]["y"] == [1.0, None, 1.0, 9.0]
    markers = fig["data"][trace_map["__events__"][0]]
    assert markers["x"] == [3] and markers["y"] == [9.0] and "hazard_spike" in markers["hovertext"][0]
    flag_line = fig["layout"]["shapes"][1]
    assert flag_line["x0"] == 3 and flag_line["line"]["color"] == figures.SEVERITY_COLOURS["critical"]


def test_step_histogram_draws_both_signs_the_multiplier_curves_and_clip_bounds() -> None:
    pos = _hist([[0] * 30 + [5, 20, 20, 5] + [0] * 30], steps=[7])
    neg = _hist([[0] * 30 + [10, 10, 0, 0] + [0] * 30], steps=[7])
    fig = valid(figures.step_histogram_figure(pos, neg, 7, "grpo", {"eps": 0.1, "c": 2.0}))
    names = [t["name"] for t in fig["data"]]
    assert names[:2] == ["tokens A>0", "tokens A<0"]
    assert sum(sum(t["y"]) for t in fig["data"][:2]) == pytest.approx(1.0)
    assert {"M(x) grpo A>0", "M(x) grpo A<0", "M(x) mhpo A>0", "M(x) mhpo A<0"} <= set(names)
    mhpo_curve = next(t for t in fig["data"] if t["name"] == "M(x) mhpo A>0")
    np.testing.assert_allclose(mhpo_curve["y"], curves.multiplier("mhpo", np.asarray(mhpo_curve["x"]), 1), rtol=1e-9)
    lines = sorted(round(s["x0"], 6) for s in fig["layout"]["shapes"])
    grpo_own = curves.clip_bounds("grpo", eps=0.1)
    assert grpo_own is not None and all(round(b, 6) in lines for b in grpo_own)
    assert all(round(b, 6) in lines for b in curves.clip_bounds("dapo"))


def test_loss_hparams_read_from_the_run_config() -> None:
    assert figures.loss_hparams({"hparams": {"c": 2.0}, "lr": 1e-6}) == {"c": 2.0}
    assert figures.loss_hparams({"eps": 0.3, "lr": 1e-6}) == {"eps": 0.3}
    assert figures.loss_hparams(None) == {}


def test_outlier_rows_largest_abs_x_first() -> None:
    rows = figures.outlier_rows(
        [
            {"sample": 0, "position": 1, "token_id": 5, "text": "a", "x": 0.1, "A": 1.0, "zeta": None},
            {"sample": 1, "position": 2, "token_id": None, "text": "b", "x": -3.0, "A": -1.0, "zeta": 2.5},
        ]
    )
    assert [r["text"] for r in rows] == ["b", "a"] and rows[1]["zeta"] == "" and rows[0]["token_id"] == ""


def test_run_rows_live_only_when_running_and_heard_from_recently() -> None:
    base = {"project": "p", "loss": "mhpo", "last_step": 3, "open_flags": 1, "created_at": 1.0}
    runs = [
        {**base, "run_id": "a", "name": "fresh", "status": "running", "last_seen_at": 990.0},
        {**base, "run_id": "b", "name": "stale", "status": "running", "last_seen_at": 10.0},
        {**base, "run_id": "c", "name": "done", "status": "finished", "last_seen_at": 999.0},
    ]
    rows = {r["id"]: r for r in figures.run_rows(runs, now=1000.0)}
    assert rows["a"]["live"] == "yes" and rows["b"]["live"] == "no" and rows["c"]["live"] == "no"
    assert rows["a"]["name"] == "[fresh](/runs/a)"


def test_config_diff_lists_only_the_keys_that_differ() -> None:
    a = {"run_id": "a" * 8, "name": "mhpo", "loss": "mhpo", "config": {"lr": 1e-6, "seed": 1, "hparams": {"c": 1.5}}}
    b = {"run_id": "b" * 8, "name": "grpo", "loss": "grpo", "config": {"lr": 1e-6, "seed": 1, "hparams": {"eps": 0.2}}}
    rows = figures.config_diff([a, b])
    assert [r["key"] for r in rows] == ["hparams.c", "hparams.eps", "loss"]
    assert rows[0][figures.run_label(b)] == "—" and rows[2][figures.run_label(a)] == "mhpo"


def test_wasserstein_of_a_shifted_bin_is_the_shift() -> None:
    bins = 40
    a = _hist([[0] * 10 + [100] + [0] * 29], steps=[0])
    b = _hist([[0] * 13 + [100] + [0] * 26], steps=[0])
    steps, dists = figures.wasserstein_by_step(a, b)
    assert steps == [0] and dists[0] == pytest.approx(3 * 4.0 / bins)
    assert figures.wasserstein_by_step(a, a)[1] == [0.0]


def _w1_reference(a: dict, b: dict) -> float:
    """Midpoint rule on a fine grid with the CDFs written out directly from the definition."""
    edges = np.linspace(-3.0, 3.0, 600_001)
    mid = (edges[1:] + edges[:-1]) / 2

    def cdf(h: dict) -> np.ndarray:
        total = sum(h["counts"][0]) + h["underflow"][0] + h["overflow"][0]
        width = (h["hi"] - h["lo"]) / h["bins"]
        pos = np.clip((mid - h["lo"]) / width, 0, h["bins"])
        whole = np.floor(pos).astype(int)
        cum = np.concatenate([[0], np.cumsum(h["counts"][0]), [sum(h["counts"][0])]])
        inside = cum[whole] + (pos - whole) * np.asarray(h["counts"][0] + [0])[np.minimum(whole, h["bins"])]
        value = (h["underflow"][0] + inside) / total
        return np.where(mid < h["lo"], 0.0, np.where(mid >= h["hi"], 1.0, value))

    return float(np.sum(np.abs(cdf(a) - cdf(b))) * (edges[1] - edges[0]))


counts = st.lists(st.integers(0, 50), min_size=8, max_size=8)


@settings(max_examples=40, deadline=None)
@given(counts, counts, st.integers(0, 5), st.integers(0, 5))
def test_wasserstein_is_exact_symmetric_and_matches_integration(ca: list[int], cb: list[int], ua: int, ob: int) -> None:
    if sum(ca) + ua == 0 or sum(cb) + ob == 0:
        return
    a = _hist([ca], steps=[1], under=[ua])
    b = _hist([cb], steps=[1], lo=-1.0, hi=2.5, over=[ob])
    (d_ab,), (d_ba,) = figures.wasserstein_by_step(a, b)[1], figures.wasserstein_by_step(b, a)[1]
    assert d_ab >= 0 and d_ab == pytest.approx(d_ba, abs=1e-12)
    assert d_ab == pytest.approx(_w1_reference(a, b), abs=1e-4)


def test_first_parting_step_and_its_figure() -> None:
    assert figures.first_parting_step([0, 1, 2, 3], [0.0, 0.01, 0.05, 0.01], 0.02) == 2
    assert figures.first_parting_step([0, 1], [0.0, 0.01], 0.02) is None
    fig = valid(figures.wasserstein_figure([("b", [0, 1, 2, 3], [0.0, 0.01, 0.05, 0.01], 2)], 0.02))
    assert [s["x0"] for s in fig["layout"]["shapes"] if s["xref"] == "x"] == [2]


def test_compare_and_empty_figures_are_valid_plotly() -> None:
    run = {"run_id": "a" * 36, "name": "r"}
    fig = valid(
        figures.compare_metric_figure(
            "policy/entropy", [(run, _series([0, 1], [2.0, 1.9])), (run, None)], x_range=[0, 1]
        )
    )
    assert len(fig["data"]) == 1 and fig["layout"]["xaxis"]["range"] == [0, 1]
    valid(figures.empty_figure("nothing yet"))
    valid(figures.step_histogram_figure(None, None, None, "mhpo"))


HOSTILE = "<a href='http://evil.example/'>x</a><img src='http://evil.example/i.png'><b>bold</b> &amp; %{y}"
ESCAPED = "&lt;a href='http://evil.example/'&gt;x&lt;/a&gt;&lt;img src='http://evil.example/i.png'&gt;"


def _shows_hostile_text_literally(fig: dict) -> None:
    """No tag, entity or template of the hostile text reaches Plotly unescaped; its escaped form does."""
    drawn = {**valid(fig), "layout": {k: v for k, v in fig["layout"].items() if k != "uirevision"}}  # never drawn
    text = json.dumps(drawn)
    assert ESCAPED in text
    assert "&lt;b&gt;bold&lt;/b&gt; &amp;amp; &#37;{y}" in text
    for raw in ("<a ", "<img", "<b>", "&amp; ", '%{y}"'):
        assert raw not in text, raw


def test_every_figure_builder_shows_user_text_literally() -> None:
    """Run names, metric keys, loss names and flag text: Plotly's pseudo-HTML in them is shown, never obeyed."""
    hist = _hist([[1, 2, 3]], steps=[0])
    run = {"run_id": "a" * 36, "name": HOSTILE}
    events = [
        {"type": "alert", "rule_name": HOSTILE, "step": 1, "severity": "warning", "message": HOSTILE, "evidence": {}},
        {"type": "flag", "kind": "x", "step": 0, "evidence": {"key": HOSTILE, "value": 1.0}},
    ]
    built = {
        "timeseries_figure": [
            figures.timeseries_figure(HOSTILE, [[HOSTILE]], {HOSTILE: _series([0, 1], [1.0, 2.0])}, events, 0, True)[0],
            figures.timeseries_figure(HOSTILE, [], {})[0],
        ],
        "heatmap_figure": [figures.heatmap_figure(hist, title=HOSTILE), figures.heatmap_figure(None, title=HOSTILE)],
        "step_histogram_figure": [figures.step_histogram_figure(hist, hist, 0, HOSTILE)],
        "compare_metric_figure": [
            figures.compare_metric_figure(HOSTILE, [(run, _series([0, 1], [1.0, 2.0]))]),
            figures.compare_metric_figure(HOSTILE, [(run, None)]),
        ],
        "wasserstein_figure": [figures.wasserstein_figure([(figures.run_label(run), [0], [0.1], 0)], 0.05)],
        "empty_figure": [figures.empty_figure(HOSTILE)],
    }
    assert set(built) == {name for name in figures.__all__ if name.endswith("_figure")}  # a new builder joins here
    for figs in built.values():
        for fig in figs:
            _shows_hostile_text_literally(fig)
    markers = figures.event_markers([[HOSTILE]], {HOSTILE: _series([0, 1], [1.0, 2.0])}, events)
    assert all(ESCAPED in t and "<a " not in t for t in markers[0][2])


def test_plain_escapes_what_plotly_would_read_as_markup() -> None:
    assert figures.plain("a<b>&c%{y}") == "a&lt;b&gt;&amp;c&#37;{y}"
    assert figures.plain("ratio/mean") == "ratio/mean"


def test_table_links_show_run_names_as_typed() -> None:
    """A Markdown link or image in a run name stays text inside the one link to the run."""
    name = "![x](http://evil.example/i.png) [click](http://evil.example/) <b>*em*</b>\n# h"
    escaped = r"\!\[x\]\(http://evil.example/i.png\) \[click\]\(http://evil.example/\) \<b\>\*em\*\</b\> # h"
    run = {"run_id": "r1", "name": name, "project": "p", "status": "running", "created_at": 1.0}
    assert figures.run_rows([run])[0]["name"] == f"[{escaped}](/runs/r1)"
    rule = {"id": 1, "name": name, "run_id": "r1", "condition": {"type": "flag"}}
    assert figures.rule_rows([rule], {"r1": name})[0]["run"] == f"[{escaped}](/runs/r1)"
    assert figures.alert_rows([{"id": 1, "run_id": "r1"}], {"r1": name})[0]["run"] == f"[{escaped}](/runs/r1)"
