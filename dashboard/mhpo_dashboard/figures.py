"""Pure functions from API payloads (C7 JSON) to Plotly figures and tables.

Nothing here talks to the network or to Dash, so every chart is unit-tested on plain data.
Figures are Plotly figure dicts (`{"data": [...], "layout": {...}}`, exactly what
`go.Figure(...).to_plotly_json()` gives and what `dcc.Graph` sends to the browser): building
`go.Figure` objects validates every point and took about a second per run page on long
runs. The tests pass each figure through `go.Figure(fig)` so the dicts stay valid Plotly.
Conventions shared by every time-series chart:

* x is the optimizer step; flags and fired alerts are vertical lines (colour = severity)
  plus hoverable, clickable markers, and the selected step is the first layout shape
  (`SELECTION_SHAPE`) so a callback can move it with one `Patch` assignment. Warnings and
  criticals are alarms (solid lines, crosses); informational flags are not: faint dotted grey
  lines and small open circles in a legend group of their own ("info flags"), which a click
  on the legend hides.
* Downsampled series (the server keeps min and max per bucket) draw the min..max band
  under the line, so a one-step spike stays visible however long the run.
* The log-ratio heat-map colours the *fraction* of a step's tokens in each bin on a log10
  scale; fractions (not counts) keep columns comparable when the server merged several
  steps into one column.
* Every user string (run names, metric keys, loss names, flag and alert text) goes into a
  figure through `plain`, so Plotly shows it as typed: its pseudo-HTML (`<a href>`, `<b>`,
  `<br>`) would otherwise become links and markup in titles, legends and hover text. In the
  tables' Markdown cells (the links to a run) it goes through `markdown_text`.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mhpo import curves
from mhpo.loss_specs import get_spec

Figure = dict[str, Any]
TITLE_FONT = {"size": 14}
MARGIN = {"l": 50, "r": 10, "t": 40, "b": 30}
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#ad494a",
]
SEVERITY_COLOURS = {"info": "#8c96a8", "warning": "#ff7f0e", "critical": "#d62728"}
# How the pages name a severity: an informational flag says outright that it is not an alarm.
SEVERITY_WORDS = {"info": "info (not an alarm)", "warning": "WARNING", "critical": "CRITICAL"}
ALARM_MARKER = {"symbol": "x", "size": 11}
INFO_MARKER = {"symbol": "circle-open", "size": 6, "color": SEVERITY_COLOURS["info"]}
SELECTION_SHAPE = 0
HEATMAP_LOG_FLOOR = -5.0

# Panels of the run page: rows of scalar keys (the README's metric names); a trailing "*" matches a prefix.
PANELS: dict[str, list[list[str]]] = {
    "trust_region": [
        ["ratio/mean", "ratio/p01", "ratio/p50", "ratio/p99"],
        ["ratio/clip_frac", "ratio/clip_frac_low", "ratio/clip_frac_high"],
        ["ratio/frac_above_0.2", "ratio/frac_below_0.2", "ratio/frac_above_1", "ratio/frac_below_1"],
    ],
    "hazard": [
        ["hazard/zeta_mean", "hazard/zeta_p99"],
        ["hazard/zeta_pos_mean", "hazard/zeta_neg_mean"],
        ["hazard/survival_mean"],
    ],
    "gradients": [
        ["grad/norm", "grad/norm/*"],
        ["grad/multiplier_mean", "grad/multiplier_min", "grad/multiplier_max"],
        ["grad/vanish_frac", "grad/update_ratio"],
    ],
    "training": [
        ["train/loss"],
        ["train/lr"],
        ["train/update_index", "train/rollout"],
        ["train/skipped", "train/skipped_total"],
    ],
    "policy": [
        ["policy/entropy"],
        ["policy/kl_k1", "policy/kl_k3"],
        ["policy/logp_mean"],
        ["policy/length_mean"],
        ["reward/mean", "reward/std"],
    ],
    # Sampler vs trainer (d = old_logp - rollout_logp): the gap, overall and by the token's probability; the
    # IS ratio w = exp(d) (its mean, min and max); the effective sample size; the divergences.
    "mismatch": [
        [
            "mismatch/abs_mean",
            "mismatch/abs_mean_p_lt_0.01",
            "mismatch/abs_mean_p_0.01_0.1",
            "mismatch/abs_mean_p_ge_0.1",
        ],
        ["mismatch/is_mean", "mismatch/is_min", "mismatch/is_max"],
        ["mismatch/ess"],
        ["mismatch/kl_k1", "mismatch/kl_k3", "mismatch/chi2"],
    ],
}
PANEL_TITLES = {
    "trust_region": "Trust region",
    "hazard": "Hazard",
    "gradients": "Gradients",
    "training": "Training",
    "policy": "Policy",
    "mismatch": "Sampler vs trainer",
}
WILDCARD_CAP = 8  # keys a "*" pattern adds to a default panel; the key explorer reaches the rest
# Panels whose on-policy steps (log-ratio exactly 0 everywhere) can be hidden.
POLICY_FILTERED_PANELS = ("trust_region", "hazard")
POLICY_KEYS = ("train/update_index", "ratio/min", "ratio/max")
# (key prefix, chart title, y-axis label): the first matching prefix describes a row.
KEY_LABELS: list[tuple[str, str, str]] = [
    ("ratio/clip_frac", "Clipped tokens", "fraction of tokens"),
    ("ratio/frac_", "Tokens far from the old policy", "fraction of tokens"),
    ("ratio/pos_mass", "Tokens with x > 0", "fraction of tokens"),
    ("ratio/neg_mass", "Tokens with x < 0", "fraction of tokens"),
    ("ratio/", "Log-ratio x = log pi/pi_old", "log-ratio x"),
    ("hazard/survival", "Survival exp(-zeta)", "survival (0..1)"),
    ("hazard/zeta_pos", "Hazard by side", "hazard zeta"),
    ("hazard/", "Hazard zeta", "hazard zeta (>= 0)"),
    ("grad/norm", "Gradient norm", "L2 norm"),
    ("grad/multiplier", "Gradient multiplier M(x)", "multiplier M(x)"),
    ("grad/vanish_frac", "Vanishing gradients, update size", "fraction / ratio"),
    ("grad/", "Gradients", "value"),
    ("policy/entropy", "Policy entropy", "nats per token"),
    ("policy/kl", "KL to the old policy", "nats"),
    ("policy/logp", "Token log-probability", "log-prob (nats)"),
    ("policy/length", "Response length", "tokens"),
    ("reward/", "Reward", "reward"),
    ("train/loss", "Training loss", "loss"),
    ("train/lr", "Learning rate", "learning rate"),
    ("train/update_index", "Update within a rollout", "index (0 = on-policy)"),
    ("train/skipped", "Skipped steps (non-finite loss)", "count"),
    ("train/", "Trainer", "value"),
    ("mismatch/abs_mean", "Sampler-trainer gap, mean |d|", "|log-prob difference|"),
    ("mismatch/is_", "IS ratio w = exp(d)", "trainer / sampler"),
    ("mismatch/ess", "Effective sample size of w", "ESS (0..1)"),
    ("mismatch/", "KL(sampler || trainer), chi2 of w", "nats / chi2"),
]
SPARSE_POINTS = 20  # at most this many points: draw markers, every point is visible
NAN_COLOUR = "rgba(214,39,40,0.35)"
LIVE_WINDOW_S = 120.0
COMPARE_DEFAULT_METRICS = [
    "ratio/std",
    "hazard/zeta_mean",
    "grad/norm",
    "policy/entropy",
    "reward/mean",
    "mismatch/abs_mean",
    "mismatch/is_mean",
    "mismatch/ess",
]
MISMATCH_HEATMAP_KEY = "mismatch"

__all__ = [
    "COMPARE_DEFAULT_METRICS",
    "MISMATCH_HEATMAP_KEY",
    "PANELS",
    "PANEL_TITLES",
    "alert_rows",
    "compare_metric_figure",
    "condition_text",
    "config_diff",
    "empty_figure",
    "entropy_budget_text",
    "event_label",
    "event_markers",
    "event_shapes",
    "first_parting_step",
    "flag_key",
    "flatten_config",
    "heatmap_columns",
    "heatmap_figure",
    "is_alarm",
    "is_live",
    "key_groups",
    "loss_hparams",
    "markdown_text",
    "marker_extension",
    "nan_shapes",
    "occupied_bins",
    "occupied_range",
    "off_policy_only",
    "on_policy_steps",
    "outlier_rows",
    "panel_rows",
    "plain",
    "row_label",
    "rule_rows",
    "run_facts",
    "run_label",
    "run_rows",
    "series_extension",
    "severity_text",
    "step_histogram_figure",
    "timeseries_figure",
    "wasserstein_by_step",
    "wasserstein_figure",
    "when",
]


def plain(text: Any) -> str:
    """`text` as Plotly must be given it to show it literally, in a title, legend, label or hover text.

    Plotly reads its text as pseudo-HTML (tags, entities) and a hovertemplate also reads
    `%{...}`; `&`, `<`, `>` and `%` become character references, which it shows as the characters.
    """
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("%", "&#37;")


# What Markdown reads inside a link's text (links, images, emphasis, code, HTML, entities and the
# tables' inline extensions ~~ ^ == ++); a cell starts with its link, so line-start marks cannot act.
MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]()!<>&~^=+|])")


def markdown_text(text: Any) -> str:
    """`text` for the text of a Markdown link in a table cell, shown as typed: never a link, image or markup.

    Every mark Markdown reads inline is backslash-escaped (Markdown shows an escaped mark as
    itself) and line breaks become spaces (a cell is one line).
    """
    return MARKDOWN_INLINE.sub(r"\\\1", re.sub(r"[\r\n]+", " ", str(text)))


def _finite_or_none(values: Iterable[float | None]) -> list[float | None]:
    """Plotly's JSON cannot carry NaN/inf; a gap in the line is the honest picture."""
    return [v if v is not None and math.isfinite(v) else None for v in values]


def _selection_shape(step: int | None) -> dict[str, Any]:
    x = step if step is not None else 0
    return {
        "type": "line",
        "xref": "x",
        "yref": "paper",
        "x0": x,
        "x1": x,
        "y0": 0,
        "y1": 1,
        "line": {"color": "#444", "width": 1, "dash": "dot"},
        "visible": step is not None,
    }


def is_alarm(event: Mapping[str, Any]) -> bool:
    """Whether a flag or alert is drawn as an alarm: every severity but "info" (none given counts as a warning)."""
    return event.get("severity", "warning") != "info"


def severity_text(severity: Any) -> str:
    """A severity in the pages' words (`SEVERITY_WORDS`); an unknown one as it is."""
    return SEVERITY_WORDS.get(str(severity), str(severity))


def severity_colour(event: Mapping[str, Any]) -> str:
    return SEVERITY_COLOURS.get(event.get("severity", "warning"), SEVERITY_COLOURS["warning"])


def event_shapes(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One vertical line per flag/alert: an alarm's solid in its severity's colour, an informational one faint and dotted."""
    return [
        {
            "type": "line",
            "xref": "x",
            "yref": "paper",
            "x0": e["step"],
            "x1": e["step"],
            "y0": 0,
            "y1": 1,
            "opacity": 0.5 if is_alarm(e) else 0.35,
            "line": {"color": severity_colour(e), "width": 1, "dash": "solid" if is_alarm(e) else "dot"},
        }
        for e in events
        if e.get("step") is not None
    ]


def event_label(event: Mapping[str, Any]) -> str:
    kind = event.get("kind") or event.get("rule_name") or event.get("type", "event")
    severity = severity_text(event.get("severity", "?"))
    return f"{event.get('type', 'flag')} {kind} ({severity}) @ {event['step']}: {event.get('message', '')}"


def entropy_budget_text(forecast: Mapping[str, Any] | None) -> str:
    """The run page's line from `GET /api/v1/runs/{id}/forecast`: "entropy budget: about N steps", the
    entropy's level as a share of its early reference, or why there is no number ("" without an answer)."""
    if not forecast:
        return ""
    if forecast.get("step") is None:
        return f"entropy budget: {forecast.get('reason') or 'not enough rollouts yet'}"
    fraction = forecast.get("fraction")
    level = f"entropy at {fraction:.0%} of its early level" if isinstance(fraction, (int, float)) else ""
    left = forecast.get("steps_left")
    if left is None:
        return f"entropy budget: entropy not falling ({level})" if level else "entropy budget: entropy not falling"
    floor = forecast.get("floor") or 0.25
    if left == 0:
        return f"entropy budget: spent, the entropy is under {floor:.0%} of its early level ({level})"
    steady = ", falling steadily" if forecast.get("confident") else ""
    return (
        f"entropy budget: about {left} steps until it falls under {floor:.0%} of its early level "
        f"(step {forecast.get('crossing_step')}; {level}{steady})"
    )


def empty_figure(message: str, height: int = 220) -> Figure:
    """A blank chart saying `message` (shown as plain text)."""
    return {
        "data": [],
        "layout": {
            "height": height,
            "margin": {"l": 40, "r": 10, "t": 30, "b": 30},
            "xaxis": {"visible": False},
            "yaxis": {"visible": False},
            "shapes": [_selection_shape(None)],
            "annotations": [
                {"text": plain(message), "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}
            ],
        },
    }


def _title(text: str) -> dict[str, Any]:
    return {"text": plain(text), "x": 0.01, "font": TITLE_FONT}


def _vline(
    x: float, colour: str, dash: str = "dash", label: str | None = None, position: str = "top"
) -> tuple[dict, dict | None]:
    """A vertical line across the plot and its optional label (Plotly's add_vline, as dicts)."""
    shape = {
        "type": "line",
        "xref": "x",
        "yref": "paper",
        "x0": x,
        "x1": x,
        "y0": 0,
        "y1": 1,
        "line": {"color": colour, "dash": dash, "width": 1},
    }
    if label is None:
        return shape, None
    return shape, {
        "text": plain(label),
        "x": x,
        "xref": "x",
        "y": 1.0 if position == "top" else 0.0,
        "yref": "paper",
        "yanchor": "bottom" if position == "top" else "top",
        "showarrow": False,
        "font": {"color": colour, "size": 10},
    }


def panel_rows(panel: str, available: Iterable[str]) -> list[list[str]]:
    """The panel's rows restricted to the keys the run actually logged (empty rows dropped)."""
    have = sorted(set(available))
    rows = []
    for row in PANELS[panel]:
        keys: list[str] = []
        for pattern in row:
            if pattern.endswith("*"):
                keys += [k for k in have if k.startswith(pattern[:-1]) and k not in keys][:WILDCARD_CAP]
            elif pattern in have and pattern not in keys:
                keys.append(pattern)
        if keys:
            rows.append(keys)
    return rows


def row_label(keys: Sequence[str]) -> tuple[str, str]:
    """(chart title, y-axis label) of a row of keys: its first key's meaning and unit."""
    first = keys[0] if keys else ""
    for prefix, title, unit in KEY_LABELS:
        if first.startswith(prefix):
            return title, unit
    return (first if len(keys) == 1 else f"{first} and {len(keys) - 1} more"), first.rsplit("/", 1)[-1]


def _finite_range(series: Mapping[str, Mapping[str, list]], keys: Sequence[str]) -> tuple[float, float] | None:
    values = [
        v
        for k in keys
        for f in ("value", "min", "max")
        for v in (series.get(k) or {}).get(f) or []
        if v is not None and math.isfinite(v)
    ]
    return (min(values), max(values)) if values else None


def _minimum_range(bounds: tuple[float, float] | None) -> dict[str, Any]:
    """A near-constant row keeps a readable range around its value instead of zooming into float noise."""
    if bounds is None:
        return {}
    lo, hi = bounds
    mid = (lo + hi) / 2
    if hi - lo > 1e-3 * max(abs(mid), 1.0):
        return {}
    half = max(0.01 * abs(mid), 0.01)
    return {"autorangeoptions": {"include": [mid - half, mid + half]}}


def _is_sparse(values: Sequence[float | None]) -> bool:
    """Few points, or a finite point with no finite neighbour: a line alone would not draw it."""
    if len(values) <= SPARSE_POINTS:
        return True
    ok = [v is not None and math.isfinite(v) for v in values]
    return any(o and (i == 0 or not ok[i - 1]) and (i == len(ok) - 1 or not ok[i + 1]) for i, o in enumerate(ok))


def nan_shapes(rows: Sequence[Sequence[str]], series: Mapping[str, Mapping[str, list]]) -> list[dict[str, Any]]:
    """A red band over each step where a row's key is NaN or infinite (the line has a gap there)."""
    shapes = []
    for r, keys in enumerate(rows):
        steps = sorted(
            {
                step
                for k in keys
                for step, v in zip(
                    (series.get(k) or {}).get("step") or [], (series.get(k) or {}).get("value") or [], strict=True
                )
                if v is None or not math.isfinite(v)
            }
        )
        axis = "y" if r == 0 else f"y{r + 1}"
        shapes += [
            {
                "type": "rect",
                "xref": "x",
                "yref": f"{axis} domain",
                "x0": s - 0.5,
                "x1": s + 0.5,
                "y0": 0,
                "y1": 1,
                "fillcolor": NAN_COLOUR,
                "line": {"color": NAN_COLOUR, "width": 1},
                "name": "nan",
            }
            for s in steps
        ]
    return shapes


def timeseries_figure(
    title: str,
    rows: Sequence[Sequence[str]],
    series: Mapping[str, Mapping[str, list]],
    events: Sequence[Mapping[str, Any]] = (),
    selected_step: int | None = None,
    downsampled: bool = False,
) -> tuple[Figure, dict[str, list[int]]]:
    """Stacked rows sharing one step axis; returns the figure and {key: [line, band-lo, band-hi]} trace indices.

    Each row has its own title (its legend group) and y-axis label with the unit; colours
    differ across the whole chart. `"__events__"` maps to the alarm markers' trace of each row (warnings and
    criticals: crosses in the severity's colour), `"__info__"` to the informational flags' (small open circles).
    The trace map lets the live callback append new points to the right traces with a Patch.
    """
    if not rows:
        return empty_figure(f"{title}: no metrics logged yet"), {}
    n, row_px, gap_px = len(rows), 130, 34
    plot_px = n * row_px + (n - 1) * gap_px
    data: list[dict[str, Any]] = []
    layout: dict[str, Any] = {}
    trace_map: dict[str, list[int]] = {}
    colour = 0
    for r, keys in enumerate(rows):
        axis = "y" if r == 0 else f"y{r + 1}"
        top = 1 - r * (row_px + gap_px) / plot_px
        row_title, unit = row_label(keys)
        layout["yaxis" if r == 0 else f"yaxis{r + 1}"] = {
            "domain": [max(0.0, top - row_px / plot_px), top],
            "anchor": "x",
            "title": {"text": plain(unit), "font": {"size": 10}},
            "tickfont": {"size": 10},
            "exponentformat": "SI",
            **_minimum_range(_finite_range(series, keys)),
        }
        for i, key in enumerate(keys):
            s = series.get(key, {"step": [], "value": [], "min": [], "max": []})
            line_colour = PALETTE[colour % len(PALETTE)]
            colour += 1
            band = []
            if downsampled:
                data.append(
                    {
                        "type": "scatter",
                        "x": list(s["step"]),
                        "y": _finite_or_none(s.get("max", s["value"])),
                        "yaxis": axis,
                        "mode": "lines",
                        "line": {"width": 0, "color": line_colour},
                        "hoverinfo": "skip",
                        "showlegend": False,
                        "name": plain(f"{key} max"),
                    }
                )
                data.append(
                    {
                        "type": "scatter",
                        "x": list(s["step"]),
                        "y": _finite_or_none(s.get("min", s["value"])),
                        "yaxis": axis,
                        "mode": "lines",
                        "line": {"width": 0, "color": line_colour},
                        "fill": "tonexty",
                        "opacity": 0.2,
                        "hoverinfo": "skip",
                        "showlegend": False,
                        "name": plain(f"{key} min"),
                    }
                )
                band = [len(data) - 1, len(data) - 2]
            values = _finite_or_none(s["value"])
            trace = {
                "type": "scatter",
                "x": list(s["step"]),
                "y": values,
                "yaxis": axis,
                "mode": "lines+markers" if _is_sparse(values) else "lines",
                "name": plain(key),
                "line": {"color": line_colour, "width": 1.5},
                "marker": {"size": 5, "color": line_colour},
                "legendgroup": f"row{r}",
                "hovertemplate": f"step %{{x}}<br>{plain(key)} = %{{y:.6g}}<extra></extra>",
            }
            if i == 0:
                trace["legendgrouptitle"] = {"text": plain(row_title), "font": {"size": 11}}
            data.append(trace)
            trace_map[key] = [len(data) - 1, *band]
    trace_map["__info__"], trace_map["__events__"] = [], []
    infos = [e for e in events if not is_alarm(e)]
    for r, (steps, ys, texts, _) in enumerate(event_markers(rows, series, infos)):
        data.append(_marker_trace(r, steps, ys, texts, "info flags", "info", INFO_MARKER))
        trace_map["__info__"].append(len(data) - 1)
    alarms = [e for e in events if is_alarm(e)]
    for r, (steps, ys, texts, colours) in enumerate(event_markers(rows, series, alarms)):
        data.append(_marker_trace(r, steps, ys, texts, "flags", "flags", {**ALARM_MARKER, "color": colours}))
        trace_map["__events__"].append(len(data) - 1)
    layout.update(
        {
            "title": _title(title),
            "height": plot_px + 80,
            "margin": {**MARGIN, "l": 70},
            "legend": {"font": {"size": 10}, "groupclick": "toggleitem", "tracegroupgap": 12},
            "hovermode": "x",
            "uirevision": title,
            "xaxis": {"title": {"text": "step"}, "anchor": f"y{n}" if n > 1 else "y"},
            "shapes": [_selection_shape(selected_step), *event_shapes(events), *nan_shapes(rows, series)],
        }
    )
    return {"data": data, "layout": layout}, trace_map


def _marker_trace(
    row: int, steps: list[int], ys: list[float], texts: list[str], name: str, group: str, marker: dict[str, Any]
) -> dict[str, Any]:
    """The flag markers of one row; one legend entry per group (its first row's) shows or hides them all."""
    return {
        "type": "scatter",
        "x": steps,
        "y": ys,
        "yaxis": "y" if row == 0 else f"y{row + 1}",
        "mode": "markers",
        "name": name,
        "legendgroup": group,
        "showlegend": row == 0,
        "marker": marker,
        "hovertext": texts,
        "hoverinfo": "text",
    }


def run_facts(run: Mapping[str, Any]) -> str:
    """The run page's one-line facts; a loss the run does not name (TRL, MLflow clients) is left out."""
    loss = [f"loss {run['loss']}"] if run.get("loss") else []
    return " · ".join(
        [
            f"project {run.get('project')}",
            *loss,
            f"status {run.get('status')}",
            f"last step {run.get('last_step')}",
            f"open flags {run.get('open_flags', 0)}",
        ]
    )


def flag_key(event: Mapping[str, Any]) -> str | None:
    """The scalar a flag or alert is about, as its evidence names it (None when it names none)."""
    evidence = event.get("evidence") or {}
    if isinstance(evidence.get("key"), str):
        return evidence["key"]
    for field in ("keys", "signals"):
        items = evidence.get(field)
        if isinstance(items, list) and items:
            first = items[0]
            name = first.get("key") if isinstance(first, Mapping) else first
            if isinstance(name, str):
                return name
    values = evidence.get("values")
    if isinstance(values, Mapping) and values:
        return str(next(iter(values)))
    return None


def _value_at(s: Mapping[str, list] | None, step: int) -> float | None:
    """The key's value at the logged step nearest `step` (None when nothing finite is there)."""
    if not s or not s.get("step"):
        return None
    xs = np.asarray(s["step"], dtype=float)
    return _finite_or_none([s["value"][int(np.abs(xs - step).argmin())]])[0]


def event_markers(
    rows: Sequence[Sequence[str]], series: Mapping[str, Mapping[str, list]], events: Sequence[Mapping[str, Any]]
) -> list[tuple[list[int], list[float], list[str], list[str]]]:
    """Per row: flag markers on the flagged key at its value (on the first key of the first row when the
    evidence names no key), as (steps, values, hover texts, severity colours). A flag about a key this
    chart does not draw, or with no finite value there, keeps only its vertical line."""
    out: list[tuple[list[int], list[float], list[str], list[str]]] = [([], [], [], []) for _ in rows]
    where = {k: r for r, keys in enumerate(rows) for k in keys}
    for e in events:
        if e.get("step") is None or not rows:
            continue
        key = flag_key(e) or rows[0][0]
        if key not in where:
            continue
        y = _value_at(series.get(key), e["step"])
        evidence_value = (e.get("evidence") or {}).get("value")
        if y is None and isinstance(evidence_value, (int, float)) and math.isfinite(evidence_value):
            y = float(evidence_value)
        if y is None:
            continue
        steps, ys, texts, colours = out[where[key]]
        steps.append(e["step"])
        ys.append(y)
        texts.append(f"{plain(event_label(e))}<br>{plain(key)} = {y:.6g}")
        colours.append(severity_colour(e))
    return out


def on_policy_steps(series: Mapping[str, Mapping[str, list]]) -> set[int]:
    """Steps (or downsampled buckets) that are wholly on-policy.

    `train/update_index` 0 marks an on-policy update; without it, a log-ratio exactly 0
    everywhere (`ratio/min == ratio/max == 0`) does. A bucket counts only when every step in
    it was on-policy (its min and max are both 0).
    """

    def zero(s: Mapping[str, list] | None) -> dict[int, bool]:
        if not s:
            return {}
        lows, highs = s.get("min") or s["value"], s.get("max") or s["value"]
        return {int(st): lo == 0 and hi == 0 for st, lo, hi in zip(s["step"], lows, highs, strict=True)}

    index = zero(series.get("train/update_index"))
    if index:
        return {st for st, z in index.items() if z}
    low, high = zero(series.get("ratio/min")), zero(series.get("ratio/max"))
    return {st for st, z in low.items() if z and high.get(st)}


def off_policy_only(
    series: Mapping[str, Mapping[str, list]], keys: Iterable[str], on_policy: set[int]
) -> dict[str, Mapping[str, list]]:
    """`series` with the on-policy steps removed from `keys` (other keys untouched)."""
    out = dict(series)
    for key in keys:
        s = series.get(key)
        if s is None or not on_policy:
            continue
        keep = [i for i, st in enumerate(s["step"]) if st not in on_policy]
        out[key] = {f: [v[i] for i in keep] for f, v in s.items() if isinstance(v, list)}
    return out


def series_extension(
    trace_map: Mapping[str, list[int]], series: Mapping[str, Mapping[str, list]]
) -> dict[int, tuple[list[int], list[float | None]]]:
    """{trace index: (new steps, new y)} for points fetched since the last refresh."""
    out: dict[int, tuple[list[int], list[float | None]]] = {}
    for key, indices in trace_map.items():
        s = series.get(key)
        if key in ("__events__", "__info__") or not s or not s["step"]:
            continue
        out[indices[0]] = (list(s["step"]), _finite_or_none(s["value"]))
        if len(indices) == 3:
            out[indices[1]] = (list(s["step"]), _finite_or_none(s.get("min", s["value"])))
            out[indices[2]] = (list(s["step"]), _finite_or_none(s.get("max", s["value"])))
    return out


def marker_extension(
    trace_map: Mapping[str, list[int]],
    rows: Sequence[Sequence[str]],
    series: Mapping[str, Mapping[str, list]],
    new_events: Sequence[Mapping[str, Any]],
) -> dict[int, tuple[list[int], list[float], list[str], list[str] | None]]:
    """{trace index: (steps, values, hover texts, colours or None)}: the flag markers `new_events` add to a
    chart `timeseries_figure` drew, each on its row's alarm or informational trace (the alarms' colours
    extend their per-point list). A chart drawn without those traces gets none."""
    out: dict[int, tuple[list[int], list[float], list[str], list[str] | None]] = {}
    for name, alarm in (("__events__", True), ("__info__", False)):
        indices = trace_map.get(name) or []
        if len(indices) != len(rows):
            continue
        chosen = [e for e in new_events if is_alarm(e) == alarm]
        for index, (steps, ys, texts, colours) in zip(indices, event_markers(rows, series, chosen), strict=True):
            if steps:
                out[index] = (steps, ys, texts, colours if alarm else None)
    return out


def heatmap_columns(hist: Mapping[str, Any]) -> tuple[list[int], list[list[float | None]]]:
    """Per column: log10 of each bin's share of all the column's values (None where empty)."""
    counts = np.asarray(hist.get("counts") or [], dtype=float)
    if counts.size == 0:
        return [], []
    under = np.asarray(hist.get("underflow") or np.zeros(len(counts)), dtype=float)
    over = np.asarray(hist.get("overflow") or np.zeros(len(counts)), dtype=float)
    totals = counts.sum(axis=1) + under + over
    with np.errstate(divide="ignore", invalid="ignore"):
        share = counts / np.where(totals > 0, totals, 1.0)[:, None]
        logs = np.where(share > 0, np.log10(np.maximum(share, 10**HEATMAP_LOG_FLOOR)), np.nan)
    z = [[None if math.isnan(v) else round(float(v), 4) for v in row] for row in logs]
    return list(hist["step"]), z


def bin_centres(lo: float, hi: float, bins: int) -> list[float]:
    width = (hi - lo) / bins
    return [lo + (i + 0.5) * width for i in range(bins)]


def heatmap_figure(
    hist: Mapping[str, Any] | None,
    events: Sequence[Mapping[str, Any]] = (),
    selected_step: int | None = None,
    title: str = "log-ratio x per step",
    x_range: Sequence[float] | None = None,
    key: str = "log_ratio",
    value_label: str = "log-ratio x",
) -> Figure:
    """Step x bin heat-map of histogram `key` (values `value_label`); z rows are steps (`transpose=True`) so
    new steps append as rows."""
    if not hist or not hist.get("step"):
        return empty_figure(f"{title}: no {key} histograms yet", height=320)
    steps, z = heatmap_columns(hist)
    ticks = list(range(int(HEATMAP_LOG_FLOOR), 1))
    trace = {
        "type": "heatmap",
        "x": steps,
        "y": bin_centres(hist["lo"], hist["hi"], hist["bins"]),
        "z": z,
        "transpose": True,
        "zmin": HEATMAP_LOG_FLOOR,
        "zmax": 0,
        "colorscale": "Viridis",
        "hoverongaps": False,
        "colorbar": {
            "title": {"text": "share"},
            "tickvals": ticks,
            "ticktext": [f"1e{t}" if t else "1" for t in ticks],
        },
        "hovertemplate": f"step %{{x}}<br>{value_label} %{{y:.3f}}<br>log10 share %{{z:.2f}}<extra></extra>",
    }
    xaxis: dict[str, Any] = {"title": {"text": "step"}}
    if x_range:
        xaxis["range"] = list(x_range)
    return {
        "data": [trace],
        "layout": {
            "title": _title(title),
            "height": 320,
            "margin": MARGIN,
            "uirevision": title,
            "xaxis": xaxis,
            "yaxis": {"title": {"text": value_label}, "range": occupied_range(hist, occupied_bins(hist))},
            "shapes": [_selection_shape(selected_step), *event_shapes(events)],
        },
    }


def occupied_bins(hist: Mapping[str, Any], known: Sequence[int] | None = None) -> list[int] | None:
    """[first, last] bin index holding any value in `hist` (widened to `known`), None if empty."""
    used = np.flatnonzero(
        np.asarray(hist.get("counts") or [], dtype=float).reshape(-1, hist.get("bins") or 1).sum(axis=0)
    )
    if used.size == 0:
        return list(known) if known else None
    first, last = int(used[0]), int(used[-1])
    return [min(first, known[0]), max(last, known[1])] if known else [first, last]


def occupied_range(hist: Mapping[str, Any], bins_used: Sequence[int] | None) -> list[float]:
    """The y range of the heat-map: the bins used, padded by a quarter of their span (>= 4 bins).

    A run that stays near x = 0 then fills the chart instead of a thin line in [-2, 2].
    """
    lo, hi, bins = hist["lo"], hist["hi"], hist["bins"]
    if not bins_used:
        return [lo, hi]
    width = (hi - lo) / bins
    first, last = lo + bins_used[0] * width, lo + (bins_used[1] + 1) * width
    pad = max(4 * width, (last - first) / 4)
    return [max(lo, first - pad), min(hi, last + pad)]


def loss_hparams(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The loss hyper-parameters a run logged in its config.

    Trainers nest them differently; we accept `hparams`, `loss_hparams` or `loss_kwargs`
    sub-dicts, else the top-level keys named as in the README's loss table (`c`, `eps`, `k_pos`, ...).
    """
    config = config or {}
    for name in ("loss_hparams", "hparams", "loss_kwargs"):
        if isinstance(config.get(name), Mapping):
            return dict(config[name])
    known = {
        "c",
        "k_pos",
        "lambda_pos",
        "k_neg",
        "lambda_neg",
        "eps",
        "eps_low",
        "eps_high",
        "clip_c",
        "tau",
        "tau_pos",
        "tau_neg",
    }
    return {k: v for k, v in config.items() if k in known}


def _valid_hparams(loss: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `hparams` that `loss` takes (a config may carry other losses' names)."""
    names = get_spec(loss).defaults
    return {k: v for k, v in hparams.items() if k in names}


def _curves(
    loss: str, hparams: Mapping[str, Any], x: np.ndarray
) -> tuple[list[tuple[str, np.ndarray, str]], str | None]:
    """Multiplier curves of `loss` for A>0 / A<0, labelled for Plotly (numpy: the server has no torch)."""
    try:
        hp = _valid_hparams(loss, hparams)
        return [
            (f"M(x) {plain(loss)} A>0", curves.multiplier(loss, x, 1, **hp), "solid"),
            (f"M(x) {plain(loss)} A<0", curves.multiplier(loss, x, -1, **hp), "dash"),
        ], None
    except (ValueError, KeyError) as exc:
        return [], f"{loss} curve unavailable: {exc}"


def _clip_bounds(loss: str, hparams: Mapping[str, Any]) -> tuple[float, float] | None:
    try:
        return curves.clip_bounds(loss, **_valid_hparams(loss, hparams))
    except (ValueError, KeyError):
        return None


def step_histogram_figure(
    pos: Mapping[str, Any] | None,
    neg: Mapping[str, Any] | None,
    step: int | None,
    loss: str | None,
    hparams: Mapping[str, Any] | None = None,
) -> Figure:
    """The selected step's log-ratio histogram split by advantage sign, with the objectives over it.

    Bars: share of the step's tokens per bin (A>0 and A<0 stacked). Right axis: the gradient
    multiplier M(x) of the run's loss (its own hyper-parameters) and of MHPO (paper
    defaults when the run is not MHPO). Vertical lines: GRPO and DAPO hard-clip bounds
    (the run's own when it is one of them), i.e. where those objectives drop the gradient.
    """
    hist = pos or neg
    title = f"step {step}: log-ratio by advantage sign" if step is not None else "selected step"
    if not hist or not hist.get("step"):
        return empty_figure(f"{title}: no histogram at this step", height=340)
    lo, hi, bins = hist["lo"], hist["hi"], hist["bins"]
    centres = bin_centres(lo, hi, bins)
    totals = sum(
        float(sum(h["counts"][0]) + h["underflow"][0] + h["overflow"][0]) for h in (pos, neg) if h and h.get("step")
    )
    data: list[dict[str, Any]] = []
    for h, name, colour in ((pos, "A>0", "#2ca02c"), (neg, "A<0", "#d62728")):
        if h and h.get("step"):
            data.append(
                {
                    "type": "bar",
                    "x": centres,
                    "y": [c / totals if totals else 0.0 for c in h["counts"][0]],
                    "name": f"tokens {name}",
                    "marker": {"color": colour},
                    "opacity": 0.6,
                    "width": (hi - lo) / bins,
                }
            )
    x = np.linspace(lo, hi, 401)
    hparams = dict(hparams or {})
    notes = []
    curve_sets = [(loss, hparams)] if loss else []
    if loss != "mhpo":
        curve_sets.append(("mhpo", {}))
    for name, hp in curve_sets:
        lines, error = _curves(name, hp, x)
        if error:
            notes.append(error)
        for label, y, dash in lines:
            data.append(
                {
                    "type": "scatter",
                    "x": x.tolist(),
                    "y": _finite_or_none(np.asarray(y, dtype=float).tolist()),
                    "yaxis": "y2",
                    "mode": "lines",
                    "name": label,
                    "line": {"dash": dash, "width": 2, "color": "#000" if name == loss else "#9467bd"},
                }
            )
    shapes: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for name, colour in (("grpo", "#ff7f0e"), ("dapo", "#8c564b")):
        bounds = _clip_bounds(name, hparams if name == loss else {})
        for b in bounds or ():
            if b is not None and math.isfinite(b):
                shape, note = _vline(b, colour, label=name.upper(), position="top" if name == "grpo" else "bottom")
                shapes.append(shape)
                if note is not None:  # always, with a label
                    annotations.append(note)
    annotations += [
        {"text": plain(n), "showarrow": False, "xref": "paper", "yref": "paper", "x": 0, "y": -0.55, "xanchor": "left"}
        for n in notes
    ]
    # The legend goes under the plot: on the right it would cover the multiplier axis and its title.
    return {
        "data": data,
        "layout": {
            "title": _title(title),
            "barmode": "stack",
            "height": 400,
            "margin": {**MARGIN, "r": 50, "b": 110},
            "legend": {
                "font": {"size": 10},
                "orientation": "h",
                "x": 0,
                "xanchor": "left",
                "y": -0.22,
                "yanchor": "top",
            },
            "xaxis": {"title": {"text": "log-ratio x"}, "range": [lo, hi]},
            "yaxis": {"title": {"text": "share of tokens"}},
            "yaxis2": {
                "title": {"text": "gradient multiplier M(x)"},
                "overlaying": "y",
                "side": "right",
                "rangemode": "tozero",
                "showgrid": False,
            },
            "shapes": shapes,
            "annotations": annotations,
        },
    }


def outlier_rows(outliers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table rows, largest |x| first, numbers rounded for reading."""

    def fmt(v: Any) -> Any:
        return (
            round(v, 4)
            if isinstance(v, float) and math.isfinite(v)
            else ("" if v is None else str(v) if isinstance(v, float) else v)
        )

    ordered = sorted(
        outliers,
        key=lambda o: -abs(o["x"]) if isinstance(o.get("x"), (int, float)) and math.isfinite(o["x"]) else -math.inf,
    )
    return [{k: fmt(o.get(k)) for k in ("sample", "position", "token_id", "text", "x", "A", "zeta")} for o in ordered]


def is_live(run: Mapping[str, Any], now: float | None = None) -> bool:
    """Running and heard from within `LIVE_WINDOW_S` (a trainer that died without `finish()`
    stops being live on its own)."""
    seen = run.get("last_seen_at")
    now = time.time() if now is None else now
    return run.get("status") == "running" and seen is not None and now - seen < LIVE_WINDOW_S


def run_rows(runs: list[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    """Runs-page rows (newest first); `id` is the run id so selections survive refreshes."""
    rows = []
    for run in sorted(runs, key=lambda r: r.get("created_at") or 0, reverse=True):
        live = is_live(run, now)
        rows.append(
            {
                "id": run["run_id"],
                "project": run.get("project"),
                "name": f"[{markdown_text(run.get('name'))}](/runs/{run['run_id']})",
                "status": run.get("status"),
                "loss": run.get("loss") or "",
                "last_step": run.get("last_step") if run.get("last_step") is not None else "",
                "live": "yes" if live else "no",
                "open_flags": run.get("open_flags", 0),
            }
        )
    return rows


# alerts page --------------------------------------------------------------------------------


def when(t: float | None) -> str:
    """A unix time as `YYYY-MM-DD HH:MM:SS` (UTC); empty when absent."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S") if t is not None else ""


def condition_text(cond: dict[str, Any] | None) -> str:
    """A rule's condition in words, e.g. `hazard/zeta_p99 > 3 for 5 steps`."""
    cond = cond or {}
    kind = cond.get("type")
    if kind == "threshold":
        n = cond.get("for_steps") or 1
        return f"{cond.get('key')} {cond.get('op')} {cond.get('value'):g} for {n} step{'s' if n != 1 else ''}"
    if kind == "spike":
        direction = {"up": "upward", "down": "downward", "both": "upward or downward"}.get(
            str(cond.get("direction")), ""
        )
        return f"{cond.get('key')} {direction} spike (robust z > {cond.get('z'):g})"
    if kind == "flag":
        flag = "any flag" if cond.get("kind") in (None, "*") else f"flag {cond.get('kind')}"
        return f"{flag} of severity {cond.get('min_severity', 'info')} or worse"
    return json.dumps(cond)


def _run_link(run_id: str | None, names: dict[str, str]) -> str:
    if not run_id:
        return "every run"
    return f"[{markdown_text(names.get(run_id, run_id[:8]))}](/runs/{run_id})"


def rule_rows(rules: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    """Rule-table rows; `id` travels with each row for the buttons but is not a column."""
    return [
        {
            "id": r.get("id"),
            "name": r.get("name"),
            "project": r.get("project"),
            "run": _run_link(r.get("run_id"), names),
            "condition": condition_text(r.get("condition")),
            "severity": severity_text(r.get("severity")),
            "cooldown": f"{r.get('cooldown_s') or 0:g} s",
            "channels": ", ".join(r.get("channels") or []),
            "enabled": "yes" if r.get("enabled") else "no",
        }
        for r in rules
    ]


def alert_rows(alerts: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "id": a.get("id"),
            "time": when(a.get("created_at")),
            "rule_name": a.get("rule_name"),
            "run": _run_link(a.get("run_id"), names),
            "step": a.get("step"),
            "severity": severity_text(a.get("severity")),
            "message": a.get("message"),
            "acknowledged": when(a.get("acknowledged_at")) or "no",
            "delivery_status": a.get("delivery_status"),
        }
        for a in alerts
    ]


# comparison --------------------------------------------------------------------------------


def flatten_config(config: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_diff(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows `{"key", <run label>: value, ...}` for the config keys (and `loss`) that differ; only those."""
    flats = []
    for run in runs:
        flat = flatten_config(run.get("config"))
        flat.setdefault("loss", run.get("loss"))
        flats.append(flat)
    missing = object()
    rows = []
    for key in sorted(set().union(*flats)) if flats else []:
        values = [f.get(key, missing) for f in flats]
        if any(v != values[0] for v in values[1:]):
            row: dict[str, Any] = {"key": key}
            for run, v in zip(runs, values, strict=True):
                row[run_label(run)] = "—" if v is missing else str(v)
            rows.append(row)
    return rows


def run_label(run: Mapping[str, Any]) -> str:
    return f"{run.get('name') or run['run_id']} ({str(run['run_id'])[:8]})"


def compare_metric_figure(
    metric: str,
    per_run: Sequence[tuple[Mapping[str, Any], Mapping[str, list] | None]],
    x_range: Sequence[float] | None = None,
) -> Figure:
    """One metric, one line per run, on a shared step axis (title and y label say what it measures)."""
    data = [
        {
            "type": "scatter",
            "x": list(s["step"]),
            "y": _finite_or_none(s["value"]),
            "mode": "lines+markers" if _is_sparse(_finite_or_none(s["value"])) else "lines",
            "marker": {"size": 5},
            "name": plain(run_label(run)),
            "line": {"color": PALETTE[i % len(PALETTE)]},
            "hovertemplate": f"step %{{x}}<br>{plain(metric)} = %{{y:.6g}}<extra>{plain(run_label(run))}</extra>",
        }
        for i, (run, s) in enumerate(per_run)
        if s and s["step"]
    ]
    meaning, unit = row_label([metric])
    bounds = _finite_range({str(i): s for i, (_, s) in enumerate(per_run) if s}, [str(i) for i in range(len(per_run))])
    layout: dict[str, Any] = {
        "title": _title(f"{metric} ({meaning})" if meaning != metric else metric),
        "height": 260,
        "margin": {**MARGIN, "l": 70},
        "hovermode": "x",
        "yaxis": {"title": {"text": plain(unit)}, "exponentformat": "SI", **_minimum_range(bounds)},
        "xaxis": {"title": {"text": "step"}, **({"range": list(x_range)} if x_range else {})},
    }
    if not data:
        layout["annotations"] = [
            {
                "text": plain(f"no run logged {metric}"),
                "showarrow": False,
                "xref": "paper",
                "yref": "paper",
                "x": 0.5,
                "y": 0.5,
            }
        ]
    return {"data": data, "layout": layout}


def _cdf_at(hist: Mapping[str, Any], col: int, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right limits of one column's CDF on `grid`.

    Values spread uniformly inside each bin; underflow is an atom at lo and overflow an atom
    at hi, so the CDF jumps there and is linear between consecutive grid points otherwise.
    """
    lo, hi, bins = hist["lo"], hist["hi"], hist["bins"]
    counts = np.asarray(hist["counts"][col], dtype=float)
    under, over = float(hist["underflow"][col]), float(hist["overflow"][col])
    total = counts.sum() + under + over
    if total <= 0:
        nan = np.full_like(grid, np.nan)
        return nan, nan
    inside = np.interp(
        grid, np.linspace(lo, hi, bins + 1), np.concatenate([[under], under + np.cumsum(counts)]) / total
    )
    left = np.where(grid <= lo, 0.0, np.where(grid > hi, 1.0, inside))
    right = np.where(grid < lo, 0.0, np.where(grid >= hi, 1.0, inside))
    return left, right


def wasserstein_by_step(
    a: Mapping[str, Any], b: Mapping[str, Any], skip: Iterable[int] = ()
) -> tuple[list[int], list[float]]:
    """W1 distance between two runs' log-ratio distributions at every step both logged, except `skip`.

    `skip` holds the steps where either run was on-policy: there both distributions are a
    point mass at 0, so the distance is 0 whatever the runs do and would hide where they part.

    W1 = integral of |F_a - F_b| dx, computed exactly on the union of both bin grids
    (values inside a bin spread uniformly; under/overflow as atoms at the range ends).
    """
    if not a.get("step") or not b.get("step"):
        return [], []
    grid = np.union1d(np.linspace(a["lo"], a["hi"], a["bins"] + 1), np.linspace(b["lo"], b["hi"], b["bins"] + 1))
    col_b = {s: i for i, s in enumerate(b["step"])}
    skipped = set(skip)
    steps, dists = [], []
    for i, s in enumerate(a["step"]):
        j = col_b.get(s)
        if j is None or s in skipped:
            continue
        (left_a, right_a), (left_b, right_b) = _cdf_at(a, i, grid), _cdf_at(b, j, grid)
        start, stop = (right_a - right_b)[:-1], (left_a - left_b)[1:]
        if np.isnan(start).any() or np.isnan(stop).any():
            continue
        dists.append(_integral_abs_linear(start, stop, np.diff(grid)))
        steps.append(int(s))
    return steps, dists


def _integral_abs_linear(start: np.ndarray, stop: np.ndarray, widths: np.ndarray) -> float:
    """Exact integral of |d| where d runs linearly from `start` to `stop` on each interval."""
    d0, d1 = np.abs(start), np.abs(stop)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = np.where(d0 + d1 > 0, (d0**2 + d1**2) / (2 * (d0 + d1)), 0.0)
    return float(np.sum(np.where(start * stop >= 0, (d0 + d1) / 2, crossing) * widths))


def first_parting_step(steps: Sequence[int], distances: Sequence[float], threshold: float) -> int | None:
    """The first step whose distance exceeds `threshold` (None if the runs never part)."""
    for s, d in zip(steps, distances, strict=True):
        if d > threshold:
            return int(s)
    return None


def wasserstein_figure(curves: Sequence[tuple[str, list[int], list[float], int | None]], threshold: float) -> Figure:
    """Per-step W1 of each run against the reference run, the threshold and where each parts."""
    data = [
        {"type": "scatter", "x": steps, "y": dists, "mode": "lines", "name": plain(label)}
        for label, steps, dists, _ in curves
    ]
    shapes = [
        {
            "type": "line",
            "xref": "paper",
            "yref": "y",
            "x0": 0,
            "x1": 1,
            "y0": threshold,
            "y1": threshold,
            "line": {"dash": "dash", "color": "#7f7f7f", "width": 1},
        }
    ]
    annotations = []
    for _, _, _, parting in curves:
        if parting is not None:
            shape, label = _vline(parting, "#d62728", dash="dot", label=f"parts at {parting}")
            shapes.append(shape)
            annotations.append(label)
    if not data:
        annotations.append(
            {
                "text": "no common histogram steps",
                "showarrow": False,
                "xref": "paper",
                "yref": "paper",
                "x": 0.5,
                "y": 0.5,
            }
        )
    return {
        "data": data,
        "layout": {
            "title": _title("Wasserstein-1 distance of log-ratio distributions vs. the first run"),
            "height": 280,
            "margin": MARGIN,
            "xaxis": {"title": {"text": "step"}},
            "yaxis": {"title": {"text": "W1 (log-ratio units)"}},
            "shapes": shapes,
            "annotations": annotations,
        },
    }


# key explorer -------------------------------------------------------------------------------


def _natural(key: str) -> list[Any]:
    """Sort key that puts layer_2 before layer_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key.lower())]


def key_groups(keys: Iterable[str], query: str = "", limit: int = 100) -> tuple[list[tuple[str, list[str], int]], int]:
    """Keys matching `query`, grouped by their first path segment: ([(prefix, shown keys, matches in
    group)], all matches). Keys that start with the query come first, then those that contain it
    (case-insensitive); at most `limit` are shown so a run with thousands of keys stays light."""
    q = query.strip().lower()
    ordered = sorted(set(keys), key=_natural)
    if q:
        starts = [k for k in ordered if k.lower().startswith(q)]
        hits = starts + [k for k in ordered if q in k.lower() and not k.lower().startswith(q)]
    else:
        hits = ordered
    groups: dict[str, tuple[list[str], list[int]]] = {}
    for i, key in enumerate(hits):
        prefix = key.split("/", 1)[0] + "/" if "/" in key else "(no prefix)"
        shown, count = groups.setdefault(prefix, ([], [0]))
        count[0] += 1
        if i < limit:
            shown.append(key)
    return [(prefix, shown, count[0]) for prefix, (shown, count) in groups.items()], len(hits)
