"""How flags are drawn and worded: informational flags are not alarms; the entropy budget line."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from mhpo_dashboard import figures


def _series(steps: list[int], values: list[float]) -> dict:
    return {"step": steps, "value": values, "min": values, "max": values}


def _flag(step: int, severity: str, key: str, kind: str = "hazard_spike") -> dict:
    return {
        "id": step,
        "type": "flag",
        "kind": kind,
        "step": step,
        "severity": severity,
        "detector": "robust_z",
        "message": f"{kind} at {step}",
        "evidence": {"key": key},
    }


ROWS = [["hazard/zeta_mean"], ["hazard/zeta_p99"]]
SERIES = {k: _series(list(range(10)), [float(i) for i in range(10)]) for k in ("hazard/zeta_mean", "hazard/zeta_p99")}
EVENTS = [
    _flag(2, "info", "hazard/zeta_p99"),
    _flag(4, "warning", "hazard/zeta_mean"),
    _flag(6, "critical", "hazard/zeta_p99"),
    _flag(8, "info", "hazard/zeta_mean", kind="on_policy"),
]


def test_info_flags_get_small_grey_marks_of_their_own_and_alarms_keep_their_crosses() -> None:
    fig, trace_map = figures.timeseries_figure("Hazard", ROWS, SERIES, EVENTS)
    go.Figure(fig)
    info = [fig["data"][i] for i in trace_map["__info__"]]
    alarms = [fig["data"][i] for i in trace_map["__events__"]]
    assert [t["x"] for t in info] == [[8], [2]] and [t["x"] for t in alarms] == [[4], [6]]
    for trace in info:
        assert trace["legendgroup"] == "info" and trace["name"] == "info flags"
        assert trace["marker"]["symbol"] == "circle-open" and trace["marker"]["size"] < figures.ALARM_MARKER["size"]
        assert trace["marker"]["color"] == figures.SEVERITY_COLOURS["info"]
    for trace in alarms:
        assert trace["legendgroup"] == "flags" and trace["marker"]["symbol"] == "x"
    assert alarms[0]["marker"]["color"] == [figures.SEVERITY_COLOURS["warning"]]
    assert alarms[1]["marker"]["color"] == [figures.SEVERITY_COLOURS["critical"]]
    assert "info (not an alarm)" in info[1]["hovertext"][0] and "CRITICAL" in alarms[1]["hovertext"][0]
    assert [t["showlegend"] for t in info] == [True, False]  # one legend entry hides every row's info marks
    assert figures.SEVERITY_COLOURS["info"] not in (figures.SEVERITY_COLOURS["warning"], "#d62728")


def test_info_flag_lines_are_faint_and_dotted_and_alarm_lines_solid_in_their_colour() -> None:
    fig, _ = figures.timeseries_figure("Hazard", ROWS, SERIES, EVENTS)
    lines = {s["x0"]: s for s in fig["layout"]["shapes"][1:]}
    assert lines[2]["line"]["dash"] == "dot" and lines[8]["line"]["dash"] == "dot"
    assert lines[2]["opacity"] < lines[4]["opacity"]
    assert lines[4]["line"] == {"color": figures.SEVERITY_COLOURS["warning"], "width": 1, "dash": "solid"}
    assert lines[6]["line"]["color"] == figures.SEVERITY_COLOURS["critical"]


def test_a_chart_drawn_before_its_flags_grows_to_the_one_drawn_with_them() -> None:
    """What the run page's live update appends (markers per kind of trace) equals the chart drawn whole."""
    fig, trace_map = figures.timeseries_figure("Hazard", ROWS, SERIES, EVENTS[:1])
    whole, _ = figures.timeseries_figure("Hazard", ROWS, SERIES, EVENTS)
    new = EVENTS[1:]
    for index, (steps, ys, texts, colours) in figures.marker_extension(trace_map, ROWS, SERIES, new).items():
        trace = fig["data"][index]
        trace["x"] += steps
        trace["y"] += ys
        trace["hovertext"] += texts
        if colours is not None:
            trace["marker"]["color"] += colours
    fig["layout"]["shapes"] += figures.event_shapes(new)
    assert fig == whole


def test_severity_words_and_the_rows_of_the_alert_tables() -> None:
    assert figures.severity_text("info") == "info (not an alarm)"
    assert figures.severity_text("critical") == "CRITICAL" and figures.severity_text("odd") == "odd"
    assert not figures.is_alarm({"severity": "info"}) and figures.is_alarm({"severity": "warning"})
    assert figures.is_alarm({})  # an event without a severity is drawn as a warning, as before
    alert = {"id": 1, "rule_name": "r", "run_id": "abc", "step": 3, "severity": "info", "message": "as written"}
    (row,) = figures.alert_rows([alert], {})
    assert row["severity"] == "info (not an alarm)" and row["message"] == "as written"


FORECAST = {
    "run_id": "r",
    "key": "policy/entropy",
    "unit": "optimizer steps",
    "floor": 0.25,
    "step": 79,
    "reference": 1.96,
    "level": 0.91,
    "fraction": 0.4643,
    "slope": -0.0105,
    "z": -7.7,
    "cov": None,
    "steps_left": 41,
    "crossing_step": 120,
    "spacing": 1.0,
    "confident": True,
    "reason": None,
}


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        (
            {},
            (
                "entropy budget: about 41 steps until it falls under 25% of its early level "
                "(step 120; entropy at 46% of its early level, falling steadily)"
            ),
        ),
        (
            {"steps_left": None, "crossing_step": None, "fraction": 1.02, "confident": False},
            "entropy budget: entropy not falling (entropy at 102% of its early level)",
        ),
        (
            {"steps_left": 0, "crossing_step": 79, "fraction": 0.08},
            "entropy budget: spent, the entropy is under 25% of its early level (entropy at 8% of its early level)",
        ),
        (
            {k: None for k in FORECAST if k not in ("run_id", "key", "unit", "floor")}
            | {"reason": "not enough rollouts yet: 12 of the 35 points of policy/entropy the forecast needs"},
            "entropy budget: not enough rollouts yet: 12 of the 35 points of policy/entropy the forecast needs",
        ),
    ],
)
def test_entropy_budget_text(changes: dict, text: str) -> None:
    assert figures.entropy_budget_text(FORECAST | changes) == text


def test_no_forecast_answer_shows_no_budget_line() -> None:
    assert figures.entropy_budget_text(None) == ""
