"""Pure functions from API payloads (C7 JSON) to Plotly figures and tables.

Nothing here talks to the network or to Dash, so every chart is unit-tested on plain data.
Figures are Plotly figure dicts (`{"data": [...], "layout": {...}}`, exactly what
`go.Figure(...).to_plotly_json()` gives and what `dcc.Graph` sends to the browser): building
`go.Figure` objects validates every point and took about a second per run page on long
runs. The tests pass each figure through `go.Figure(fig)` so the dicts stay valid Plotly.
Conventions shared by every time-series chart:

* x is the optimizer step; flags and fired alerts are vertical lines (colour = severity)
  plus hoverable, clickable markers, and the selected step is the first layout shape
  (`SELECTION_SHAPE`) so a callback can move it with one `Patch` assignment.
* Downsampled series (the server keeps min and max per bucket) draw the min..max band
  under the line, so a one-step spike stays visible however long the run.
* The log-ratio heat-map colours the *fraction* of a step's tokens in each bin on a log10
  scale; fractions (not counts) keep columns comparable when the server merged several
  steps into one column.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Figure = dict[str, Any]
TITLE_FONT = {"size": 14}
MARGIN = {"l": 50, "r": 10, "t": 40, "b": 30}
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
SEVERITY_COLOURS = {"info": "#1f77b4", "warning": "#ff7f0e", "critical": "#d62728"}
SELECTION_SHAPE = 0
HEATMAP_LOG_FLOOR = -5.0

# Panels of the run page: rows of scalar keys (DESIGN 2.2); a trailing "*" matches a prefix.
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
    "policy": [
        ["policy/entropy"],
        ["policy/kl_k1", "policy/kl_k3"],
        ["policy/logp_mean"],
        ["policy/length_mean"],
        ["reward/mean", "reward/std"],
    ],
}
PANEL_TITLES = {"trust_region": "Trust region", "hazard": "Hazard", "gradients": "Gradients",
                "policy": "Policy"}
LIVE_WINDOW_S = 120.0
COMPARE_DEFAULT_METRICS = ["ratio/std", "hazard/zeta_mean", "grad/norm", "policy/entropy", "reward/mean"]

__all__ = [
    "COMPARE_DEFAULT_METRICS",
    "PANELS",
    "PANEL_TITLES",
    "compare_metric_figure",
    "config_diff",
    "empty_figure",
    "event_label",
    "event_markers",
    "event_shapes",
    "first_parting_step",
    "flatten_config",
    "heatmap_columns",
    "heatmap_figure",
    "is_live",
    "loss_hparams",
    "occupied_bins",
    "occupied_range",
    "outlier_rows",
    "panel_rows",
    "run_label",
    "run_rows",
    "series_extension",
    "step_histogram_figure",
    "timeseries_figure",
    "wasserstein_by_step",
    "wasserstein_figure",
]


def _finite_or_none(values: Iterable[float | None]) -> list[float | None]:
    """Plotly's JSON cannot carry NaN/inf; a gap in the line is the honest picture."""
    return [v if v is not None and math.isfinite(v) else None for v in values]


def _selection_shape(step: int | None) -> dict[str, Any]:
    x = step if step is not None else 0
    return {"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
            "line": {"color": "#444", "width": 1, "dash": "dot"}, "visible": step is not None}


def event_shapes(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One vertical line per flag/alert, coloured by severity."""
    return [{"type": "line", "xref": "x", "yref": "paper", "x0": e["step"], "x1": e["step"],
             "y0": 0, "y1": 1, "opacity": 0.5,
             "line": {"color": SEVERITY_COLOURS.get(e.get("severity", "warning"), "#ff7f0e"), "width": 1}}
            for e in events if e.get("step") is not None]


def event_label(event: Mapping[str, Any]) -> str:
    kind = event.get("kind") or event.get("rule_name") or event.get("type", "event")
    return f"{event.get('type', 'flag')} {kind} ({event.get('severity', '?')}) @ {event['step']}: {event.get('message', '')}"


def empty_figure(message: str, height: int = 220) -> Figure:
    return {"data": [], "layout": {
        "height": height, "margin": {"l": 40, "r": 10, "t": 30, "b": 30}, "xaxis": {"visible": False},
        "yaxis": {"visible": False}, "shapes": [_selection_shape(None)],
        "annotations": [{"text": message, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}]}}


def _title(text: str) -> dict[str, Any]:
    return {"text": text, "x": 0.01, "font": TITLE_FONT}


def _vline(x: float, colour: str, dash: str = "dash", label: str | None = None, position: str = "top") -> tuple[dict, dict | None]:
    """A vertical line across the plot and its optional label (Plotly's add_vline, as dicts)."""
    shape = {"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
             "line": {"color": colour, "dash": dash, "width": 1}}
    if label is None:
        return shape, None
    return shape, {"text": label, "x": x, "xref": "x", "y": 1.0 if position == "top" else 0.0, "yref": "paper",
                   "yanchor": "bottom" if position == "top" else "top", "showarrow": False,
                   "font": {"color": colour, "size": 10}}


def panel_rows(panel: str, available: Iterable[str]) -> list[list[str]]:
    """The panel's rows restricted to the keys the run actually logged (empty rows dropped)."""
    have = sorted(set(available))
    rows = []
    for row in PANELS[panel]:
        keys: list[str] = []
        for pattern in row:
            if pattern.endswith("*"):
                keys += [k for k in have if k.startswith(pattern[:-1]) and k not in keys]
            elif pattern in have and pattern not in keys:
                keys.append(pattern)
        if keys:
            rows.append(keys)
    return rows


def timeseries_figure(title: str, rows: Sequence[Sequence[str]], series: Mapping[str, Mapping[str, list]],
                      events: Sequence[Mapping[str, Any]] = (), selected_step: int | None = None,
                      downsampled: bool = False) -> tuple[Figure, dict[str, list[int]]]:
    """Stacked rows sharing one step axis; returns the figure and {key: [line, band-lo, band-hi]} trace indices.

    The trace map lets the live callback append new points to the right traces with a Patch.
    """
    if not rows:
        return empty_figure(f"{title}: no metrics logged yet"), {}
    n, gap = len(rows), 0.04
    height = (1 - gap * (n - 1)) / n
    data: list[dict[str, Any]] = []
    layout: dict[str, Any] = {}
    trace_map: dict[str, list[int]] = {}
    for r, keys in enumerate(rows):
        axis = "y" if r == 0 else f"y{r + 1}"
        top = 1 - r * (height + gap)
        layout["yaxis" if r == 0 else f"yaxis{r + 1}"] = {"domain": [max(0.0, top - height), top], "anchor": "x"}
        for i, key in enumerate(keys):
            s = series.get(key, {"step": [], "value": [], "min": [], "max": []})
            colour = PALETTE[i % len(PALETTE)]
            band = []
            if downsampled:
                data.append({"type": "scatter", "x": list(s["step"]), "y": _finite_or_none(s.get("max", s["value"])),
                             "yaxis": axis, "mode": "lines", "line": {"width": 0, "color": colour},
                             "hoverinfo": "skip", "showlegend": False, "name": f"{key} max"})
                data.append({"type": "scatter", "x": list(s["step"]), "y": _finite_or_none(s.get("min", s["value"])),
                             "yaxis": axis, "mode": "lines", "line": {"width": 0, "color": colour}, "fill": "tonexty",
                             "opacity": 0.2, "hoverinfo": "skip", "showlegend": False, "name": f"{key} min"})
                band = [len(data) - 1, len(data) - 2]
            data.append({"type": "scatter", "x": list(s["step"]), "y": _finite_or_none(s["value"]), "yaxis": axis,
                         "mode": "lines", "name": key, "line": {"color": colour, "width": 1.5},
                         "legendgroup": f"row{r}"})
            trace_map[key] = [len(data) - 1, *band]
    marker_steps, marker_y, marker_text = event_markers(series.get(rows[0][0]), events)
    data.append({"type": "scatter", "x": marker_steps, "y": marker_y, "mode": "markers", "name": "flags",
                 "marker": {"symbol": "x", "size": 10, "color": "#d62728"}, "hovertext": marker_text,
                 "hoverinfo": "text"})
    trace_map["__events__"] = [len(data) - 1]
    layout.update({"title": _title(title), "height": max(220, 150 * n + 60), "margin": MARGIN,
                   "legend": {"font": {"size": 10}}, "hovermode": "x unified", "uirevision": title,
                   "xaxis": {"title": {"text": "step"}, "anchor": f"y{n}" if n > 1 else "y"},
                   "shapes": [_selection_shape(selected_step), *event_shapes(events)]})
    return {"data": data, "layout": layout}, trace_map


def event_markers(first: Mapping[str, list] | None, events: Sequence[Mapping[str, Any]]
                   ) -> tuple[list[int], list[float | None], list[str]]:
    """Flag markers sit on the panel's first curve at the flagged step (nearest logged step)."""
    steps, ys, texts = [], [], []
    xs = np.asarray(first["step"] if first else [], dtype=float)
    vals = _finite_or_none(first["value"]) if first else []
    for e in events:
        if e.get("step") is None:
            continue
        y = None
        if len(xs):
            y = vals[int(np.abs(xs - e["step"]).argmin())]
        steps.append(e["step"])
        ys.append(y if y is not None else 0.0)
        texts.append(event_label(e))
    return steps, ys, texts


def series_extension(trace_map: Mapping[str, list[int]], series: Mapping[str, Mapping[str, list]]
                     ) -> dict[int, tuple[list[int], list[float | None]]]:
    """{trace index: (new steps, new y)} for points fetched since the last refresh."""
    out: dict[int, tuple[list[int], list[float | None]]] = {}
    for key, indices in trace_map.items():
        s = series.get(key)
        if key == "__events__" or not s or not s["step"]:
            continue
        out[indices[0]] = (list(s["step"]), _finite_or_none(s["value"]))
        if len(indices) == 3:
            out[indices[1]] = (list(s["step"]), _finite_or_none(s.get("min", s["value"])))
            out[indices[2]] = (list(s["step"]), _finite_or_none(s.get("max", s["value"])))
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
        logs = np.where(share > 0, np.log10(np.maximum(share, 10 ** HEATMAP_LOG_FLOOR)), np.nan)
    z = [[None if math.isnan(v) else round(float(v), 4) for v in row] for row in logs]
    return list(hist["step"]), z


def bin_centres(lo: float, hi: float, bins: int) -> list[float]:
    width = (hi - lo) / bins
    return [lo + (i + 0.5) * width for i in range(bins)]


def heatmap_figure(hist: Mapping[str, Any] | None, events: Sequence[Mapping[str, Any]] = (),
                   selected_step: int | None = None, title: str = "log-ratio x per step",
                   x_range: Sequence[float] | None = None) -> Figure:
    """Step x bin heat-map; z rows are steps (`transpose=True`) so new steps append as rows."""
    if not hist or not hist.get("step"):
        return empty_figure(f"{title}: no log_ratio histograms yet", height=320)
    steps, z = heatmap_columns(hist)
    ticks = list(range(int(HEATMAP_LOG_FLOOR), 1))
    trace = {"type": "heatmap", "x": steps, "y": bin_centres(hist["lo"], hist["hi"], hist["bins"]), "z": z,
             "transpose": True, "zmin": HEATMAP_LOG_FLOOR, "zmax": 0, "colorscale": "Viridis", "hoverongaps": False,
             "colorbar": {"title": {"text": "share"}, "tickvals": ticks,
                          "ticktext": [f"1e{t}" if t else "1" for t in ticks]},
             "hovertemplate": "step %{x}<br>x %{y:.3f}<br>log10 share %{z:.2f}<extra></extra>"}
    xaxis: dict[str, Any] = {"title": {"text": "step"}}
    if x_range:
        xaxis["range"] = list(x_range)
    return {"data": [trace], "layout": {
        "title": _title(title), "height": 320, "margin": MARGIN, "uirevision": title, "xaxis": xaxis,
        "yaxis": {"title": {"text": "log-ratio x"}, "range": occupied_range(hist, occupied_bins(hist))},
        "shapes": [_selection_shape(selected_step), *event_shapes(events)]}}


def occupied_bins(hist: Mapping[str, Any], known: Sequence[int] | None = None) -> list[int] | None:
    """[first, last] bin index holding any value in `hist` (widened to `known`), None if empty."""
    used = np.flatnonzero(np.asarray(hist.get("counts") or [], dtype=float).reshape(-1, hist.get("bins") or 1).sum(axis=0))
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
    sub-dicts, else the top-level keys named as in DESIGN 1 (`c`, `eps`, `k_pos`, ...).
    """
    config = config or {}
    for name in ("loss_hparams", "hparams", "loss_kwargs"):
        if isinstance(config.get(name), Mapping):
            return dict(config[name])
    known = {"c", "k_pos", "lambda_pos", "k_neg", "lambda_neg", "eps", "eps_low", "eps_high",
             "clip_c", "tau", "tau_pos", "tau_neg"}
    return {k: v for k, v in config.items() if k in known}


def _valid_hparams(loss: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `hparams` that `loss` takes (a config may carry other losses' names)."""
    from mhpo.losses import get_loss

    names = get_loss(loss).defaults
    return {k: v for k, v in hparams.items() if k in names}


def _curves(loss: str, hparams: Mapping[str, Any], x: np.ndarray) -> tuple[list[tuple[str, np.ndarray, str]], str | None]:
    """Multiplier curves of `loss` for A>0 / A<0 (mhpo.curves, imported lazily: it loads torch)."""
    from mhpo import curves

    try:
        hp = _valid_hparams(loss, hparams)
        return [(f"M(x) {loss} A>0", curves.multiplier(loss, x, 1, **hp), "solid"),
                (f"M(x) {loss} A<0", curves.multiplier(loss, x, -1, **hp), "dash")], None
    except (ValueError, KeyError) as exc:
        return [], f"{loss} curve unavailable: {exc}"


def _clip_bounds(loss: str, hparams: Mapping[str, Any]) -> tuple[float, float] | None:
    from mhpo import curves

    try:
        return curves.clip_bounds(loss, **_valid_hparams(loss, hparams))
    except (ValueError, KeyError):
        return None


def step_histogram_figure(pos: Mapping[str, Any] | None, neg: Mapping[str, Any] | None, step: int | None,
                          loss: str | None, hparams: Mapping[str, Any] | None = None) -> Figure:
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
    totals = sum(float(sum(h["counts"][0]) + h["underflow"][0] + h["overflow"][0])
                 for h in (pos, neg) if h and h.get("step"))
    data: list[dict[str, Any]] = []
    for h, name, colour in ((pos, "A>0", "#2ca02c"), (neg, "A<0", "#d62728")):
        if h and h.get("step"):
            data.append({"type": "bar", "x": centres, "y": [c / totals if totals else 0.0 for c in h["counts"][0]],
                         "name": f"tokens {name}", "marker": {"color": colour}, "opacity": 0.6,
                         "width": (hi - lo) / bins})
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
            data.append({"type": "scatter", "x": x.tolist(), "y": _finite_or_none(np.asarray(y, dtype=float).tolist()),
                         "yaxis": "y2", "mode": "lines", "name": label,
                         "line": {"dash": dash, "width": 2, "color": "#000" if name == loss else "#9467bd"}})
    shapes, annotations = [], []
    for name, colour in (("grpo", "#ff7f0e"), ("dapo", "#8c564b")):
        bounds = _clip_bounds(name, hparams if name == loss else {})
        for b in bounds or ():
            if b is not None and math.isfinite(b):
                shape, label = _vline(b, colour, label=name.upper(), position="top" if name == "grpo" else "bottom")
                shapes.append(shape)
                annotations.append(label)
    annotations += [{"text": n, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0, "y": -0.2} for n in notes]
    return {"data": data, "layout": {
        "title": _title(title), "barmode": "stack", "height": 340, "margin": {**MARGIN, "r": 50},
        "legend": {"font": {"size": 10}, "x": 1.08}, "xaxis": {"title": {"text": "log-ratio x"}, "range": [lo, hi]},
        "yaxis": {"title": {"text": "share of tokens"}},
        "yaxis2": {"title": {"text": "gradient multiplier M(x)"}, "overlaying": "y", "side": "right",
                   "rangemode": "tozero", "showgrid": False},
        "shapes": shapes, "annotations": annotations}}


def outlier_rows(outliers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table rows, largest |x| first, numbers rounded for reading."""
    def fmt(v: Any) -> Any:
        return round(v, 4) if isinstance(v, float) and math.isfinite(v) else ("" if v is None else str(v) if isinstance(v, float) else v)

    ordered = sorted(outliers, key=lambda o: -abs(o["x"]) if isinstance(o.get("x"), (int, float)) and math.isfinite(o["x"]) else -math.inf)
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
        rows.append({
            "id": run["run_id"],
            "project": run.get("project"),
            "name": f"[{run.get('name')}](/runs/{run['run_id']})",
            "status": run.get("status"),
            "loss": run.get("loss") or "",
            "last_step": run.get("last_step") if run.get("last_step") is not None else "",
            "live": "● live" if live else "",
            "open_flags": run.get("open_flags", 0),
        })
    return rows


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
            for run, v in zip(runs, values):
                row[run_label(run)] = "—" if v is missing else str(v)
            rows.append(row)
    return rows


def run_label(run: Mapping[str, Any]) -> str:
    return f"{run.get('name') or run['run_id']} ({str(run['run_id'])[:8]})"


def compare_metric_figure(metric: str, per_run: Sequence[tuple[Mapping[str, Any], Mapping[str, list] | None]],
                          x_range: Sequence[float] | None = None) -> Figure:
    """One metric, one line per run, on a shared step axis."""
    data = [{"type": "scatter", "x": list(s["step"]), "y": _finite_or_none(s["value"]), "mode": "lines",
             "name": run_label(run), "line": {"color": PALETTE[i % len(PALETTE)]}}
            for i, (run, s) in enumerate(per_run) if s and s["step"]]
    layout: dict[str, Any] = {"title": _title(metric), "height": 260, "margin": MARGIN, "hovermode": "x unified",
                              "xaxis": {"title": {"text": "step"}, **({"range": list(x_range)} if x_range else {})}}
    if not data:
        layout["annotations"] = [{"text": f"no run logged {metric}", "showarrow": False, "xref": "paper",
                                  "yref": "paper", "x": 0.5, "y": 0.5}]
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
    inside = np.interp(grid, np.linspace(lo, hi, bins + 1), np.concatenate([[under], under + np.cumsum(counts)]) / total)
    left = np.where(grid <= lo, 0.0, np.where(grid > hi, 1.0, inside))
    right = np.where(grid < lo, 0.0, np.where(grid >= hi, 1.0, inside))
    return left, right


def wasserstein_by_step(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[list[int], list[float]]:
    """W1 distance between two runs' log-ratio distributions at every step both logged.

    W1 = integral of |F_a - F_b| dx, computed exactly on the union of both bin grids
    (values inside a bin spread uniformly; under/overflow as atoms at the range ends).
    """
    if not a.get("step") or not b.get("step"):
        return [], []
    grid = np.union1d(np.linspace(a["lo"], a["hi"], a["bins"] + 1), np.linspace(b["lo"], b["hi"], b["bins"] + 1))
    col_b = {s: i for i, s in enumerate(b["step"])}
    steps, dists = [], []
    for i, s in enumerate(a["step"]):
        j = col_b.get(s)
        if j is None:
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
    for s, d in zip(steps, distances):
        if d > threshold:
            return int(s)
    return None


def wasserstein_figure(curves: Sequence[tuple[str, list[int], list[float], int | None]],
                       threshold: float) -> Figure:
    """Per-step W1 of each run against the reference run, the threshold and where each parts."""
    data = [{"type": "scatter", "x": steps, "y": dists, "mode": "lines", "name": label}
            for label, steps, dists, _ in curves]
    shapes = [{"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": threshold, "y1": threshold,
               "line": {"dash": "dash", "color": "#7f7f7f", "width": 1}}]
    annotations = []
    for _, _, _, parting in curves:
        if parting is not None:
            shape, label = _vline(parting, "#d62728", dash="dot", label=f"parts at {parting}")
            shapes.append(shape)
            annotations.append(label)
    if not data:
        annotations.append({"text": "no common histogram steps", "showarrow": False, "xref": "paper", "yref": "paper",
                            "x": 0.5, "y": 0.5})
    return {"data": data, "layout": {
        "title": _title("Wasserstein-1 distance of log-ratio distributions vs. the first run"), "height": 280,
        "margin": MARGIN, "xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "W1 (log-ratio units)"}},
        "shapes": shapes, "annotations": annotations}}
