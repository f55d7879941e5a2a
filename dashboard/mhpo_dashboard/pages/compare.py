"""`/compare?runs=<id>,<id>[,...]`: two or more runs on one shared step axis.

Shows the chosen metrics overlaid, the log-ratio heat-maps side by side, the per-step
Wasserstein-1 distance of each run's log-ratio distribution to the first run's (and the
first step where it exceeds the threshold: where the runs part), and the config keys whose
values differ. Histograms are fetched with the same step range and bucket budget for every
run, so the server's bucketing lines up and the distances compare like with like. Steps
where either run was on-policy (all log-ratios exactly 0) are left out of the distance: both
distributions are then the same point mass and the distance says nothing.

Its cost is bounded whatever the URL holds: at most `max_compare_runs()` runs (a longer list
is refused on the page before anything is read) and the per-run reads go through
`parallel`'s small pool.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import dash
from dash import Input, Output, State, callback, dash_table, dcc, html

from mhpo_dashboard import figures
from mhpo_dashboard.api import ApiClient, ApiError, parallel
from mhpo_dashboard.app import api, max_compare_runs

dash.register_page(__name__, path="/compare", title="Compare · MHPO Monitor", name="Compare", order=1)

MAX_POINTS = 400  # per series: enough for a ~700-px chart; fewer points draw faster
MAX_HEATMAP_STEPS = 300
DEFAULT_THRESHOLD = 0.02


def _run_ids(runs: str | None) -> list[str]:
    return list(dict.fromkeys(r.strip() for r in (runs or "").split(",") if r.strip()))


def refusal(ids: list[str] | None) -> str | None:
    """Why these run ids cannot be compared (None when they can)."""
    limit = max_compare_runs()
    if not ids or len(ids) < 2:
        return "pick two or more runs to compare"
    if len(ids) > limit:
        return (
            f"{len(ids)} runs asked for; a comparison shows at most {limit} "
            "(the server's MHPO_DASHBOARD_MAX_COMPARE_RUNS): pick fewer runs"
        )
    return None


def _picker(client: ApiClient, chosen: list[str]) -> Any:
    try:
        options = [
            {"label": f"{r['project']} / {r['name']} ({r['run_id'][:8]})", "value": r["run_id"]} for r in client.runs()
        ]
    except ApiError as exc:
        return html.P(str(exc), className="error")
    return html.Div(
        [
            dcc.Dropdown(id="compare-pick", options=options, value=chosen, multi=True, placeholder="pick runs"),
            dcc.Link("compare", id="compare-pick-link", href="/compare", className="button"),
        ],
        className="toolbar",
    )


def _x_range(runs: list[dict[str, Any]]) -> list[float]:
    last = max((r.get("last_step") or 0) for r in runs)
    return [-0.5, last + 0.5]


def metric_figures(client: ApiClient, runs: list[dict[str, Any]], metrics: list[str]) -> list[Any]:
    """One chart per metric; ratio and hazard metrics without each run's on-policy steps (as on the run page)."""
    wanted = list(dict.fromkeys([*metrics, *figures.POLICY_KEYS]))
    fetched = parallel(*[lambda r=r: client.scalars(r["run_id"], wanted, max_points=MAX_POINTS) for r in runs])
    filtered = [m for m in metrics if m.startswith(("ratio/", "hazard/"))]
    data = {
        r["run_id"]: figures.off_policy_only(f["series"], filtered, figures.on_policy_steps(f["series"]))
        for r, f in zip(runs, fetched, strict=True)
    }
    x_range = _x_range(runs)
    return [
        dcc.Graph(
            figure=figures.compare_metric_figure(m, [(r, data[r["run_id"]].get(m)) for r in runs], x_range),
            className="graph compare-metric",
        )
        for m in metrics
    ]


def _histograms(
    client: ApiClient, runs: list[dict[str, Any]], keys: list[dict[str, list[str]]], key: str = "log_ratio"
) -> dict[str, dict[str, Any] | None]:
    """Every run's `key` histograms over the same step range and bucket budget (so buckets line up)."""
    end = max((r.get("last_step") or 0) for r in runs)
    fetched = parallel(
        *[
            lambda r=r, k=k: (
                client.histograms(r["run_id"], key, start=0, end=end, max_steps=MAX_HEATMAP_STEPS)
                if key in k.get("histograms", [])
                else None
            )
            for r, k in zip(runs, keys, strict=True)
        ]
    )
    return {r["run_id"]: h for r, h in zip(runs, fetched, strict=True)}


def on_policy(client: ApiClient, runs: list[dict[str, Any]], keys: list[dict[str, list[str]]]) -> dict[str, set[int]]:
    """Each run's on-policy steps, read with the histograms' step range and budget so buckets line up."""
    end = max((r.get("last_step") or 0) for r in runs)
    fetched = parallel(
        *[
            lambda r=r, k=k: client.scalars(
                r["run_id"],
                [p for p in figures.POLICY_KEYS if p in k.get("scalars", [])],
                start=0,
                end=end,
                max_points=MAX_HEATMAP_STEPS,
            )
            for r, k in zip(runs, keys, strict=True)
        ]
    )
    return {r["run_id"]: figures.on_policy_steps(f["series"]) for r, f in zip(runs, fetched, strict=True)}


def distance_figure(
    hists: dict[str, dict[str, Any] | None],
    runs: list[dict[str, Any]],
    threshold: float,
    skip: dict[str, set[int]] | None = None,
) -> Any:
    ref = hists.get(runs[0]["run_id"])
    skip = skip or {}
    curves = []
    for run in runs[1:]:
        other = hists.get(run["run_id"])
        if not ref or not other:
            continue
        steps, dists = figures.wasserstein_by_step(
            ref, other, skip.get(runs[0]["run_id"], set()) | skip.get(run["run_id"], set())
        )
        curves.append((figures.run_label(run), steps, dists, figures.first_parting_step(steps, dists, threshold)))
    return figures.wasserstein_figure(curves, threshold), curves


def layout(runs: str | None = None, **_: Any) -> Any:
    client = api()
    ids = _run_ids(runs)
    refused = refusal(ids)
    if refused is not None:
        chosen = ids if len(ids) <= max_compare_runs() else []
        return html.Div(
            [html.H2("Compare runs"), _picker(client, chosen), html.P(refused, id="compare-refused", className="error")]
        )
    picker = _picker(client, ids)
    try:
        infos = parallel(*[lambda i=i: client.run(i) for i in ids])
        keys = parallel(*[lambda i=i: client.keys(i) for i in ids])
        scalar_keys = sorted(set().union(*(k.get("scalars", []) for k in keys)))
        metrics = [m for m in figures.COMPARE_DEFAULT_METRICS if m in scalar_keys] or scalar_keys[:3]
        mm_key = figures.MISMATCH_HEATMAP_KEY
        hists, mm_hists, metric_graphs, skip = parallel(
            lambda: _histograms(client, infos, keys),
            lambda: _histograms(client, infos, keys, mm_key),
            lambda: metric_figures(client, infos, metrics),
            lambda: on_policy(client, infos, keys),
        )
    except ApiError as exc:
        return html.Div([html.H2("Compare runs"), picker, html.P(str(exc), className="error")])
    x_range = _x_range(infos)
    heatmaps = [
        dcc.Graph(
            figure=figures.heatmap_figure(hists[r["run_id"]], title=figures.run_label(r), x_range=x_range),
            className="graph compare-heatmap",
        )
        for r in infos
    ]
    mismatch: list[Any] = []
    if any(mm_hists.values()):  # sampler-vs-trainer gap, e.g. a corrected run next to an uncorrected one
        mismatch = [
            html.H3("sampler-trainer gap heat-maps", id="compare-mismatch"),
            html.Div(
                [
                    dcc.Graph(
                        figure=figures.heatmap_figure(
                            mm_hists[r["run_id"]],
                            title=figures.run_label(r),
                            x_range=x_range,
                            key=mm_key,
                            value_label="d = old - rollout log-prob",
                        ),
                        className="graph compare-heatmap",
                    )
                    for r in infos
                ],
                className="row side-by-side",
                style={"gridTemplateColumns": f"repeat({len(infos)}, 1fr)"},
            ),
        ]
    dist_fig, curves = distance_figure(hists, infos, DEFAULT_THRESHOLD, skip)
    diff = figures.config_diff(infos)
    columns = [{"id": "key", "name": "config key"}] + [
        {"id": figures.run_label(r), "name": figures.run_label(r)} for r in infos
    ]
    return html.Div(
        [
            html.H2("Compare runs"),
            picker,
            dcc.Store(id="compare-runs", data=ids),
            html.Div(
                [
                    html.Label("metrics "),
                    dcc.Dropdown(id="compare-metrics", options=scalar_keys, value=metrics, multi=True),
                ],
                className="toolbar",
            ),
            html.Div(metric_graphs, id="compare-metric-graphs", className="grid"),
            html.H3("log-ratio heat-maps"),
            html.Div(
                heatmaps, className="row side-by-side", style={"gridTemplateColumns": f"repeat({len(infos)}, 1fr)"}
            ),
            *mismatch,
            html.H3("where the runs part"),
            html.P(
                "Wasserstein-1 distance between each run's log-ratio distribution and the first run's, per step; "
                "steps where either run was on-policy are left out.",
                className="hint",
            ),
            html.Div(
                [
                    html.Label("threshold (W1, log-ratio units) "),
                    dcc.Input(
                        id="compare-threshold",
                        type="number",
                        value=DEFAULT_THRESHOLD,
                        min=0,
                        step=0.005,
                        debounce=True,
                        style={"width": "8em"},
                    ),
                ],
                className="toolbar",
            ),
            dcc.Graph(id="compare-distance", figure=dist_fig, className="graph"),
            html.Ul(_parting_text(curves), id="compare-parting"),
            html.H3("config differences"),
            dash_table.DataTable(id="compare-config", columns=columns, data=diff, style_cell={"textAlign": "left"})
            if diff
            else html.P("the runs' configs are identical", id="compare-config"),
        ]
    )


def _parting_text(curves: list[tuple[str, list[int], list[float], int | None]]) -> list[Any]:
    return [
        html.Li(
            f"{label}: "
            + (
                f"parts from the first run at step {parting}"
                if parting is not None
                else "never parts from the first run above the threshold"
            )
        )
        for label, _, _, parting in curves
    ] or [html.Li("no common log_ratio histogram steps")]


@callback(Output("compare-pick-link", "href"), Input("compare-pick", "value"))
def pick_link(chosen: list[str] | None) -> str:
    return "/compare?runs=" + quote(",".join(chosen or []), safe=",")


@callback(
    Output("compare-metric-graphs", "children"),
    Input("compare-metrics", "value"),
    State("compare-runs", "data"),
    prevent_initial_call=True,
)
def change_metrics(metrics: list[str] | None, ids: list[str] | None) -> list[Any]:
    refused = refusal(ids)
    if refused is not None:
        return [html.P(refused, className="error")]
    client = api()
    try:
        return metric_figures(client, parallel(*[lambda i=i: client.run(i) for i in ids or []]), metrics or [])
    except ApiError as exc:
        return [html.P(str(exc), className="error")]


@callback(
    Output("compare-distance", "figure"),
    Output("compare-parting", "children"),
    Input("compare-threshold", "value"),
    State("compare-runs", "data"),
    prevent_initial_call=True,
)
def change_threshold(threshold: float | None, ids: list[str] | None) -> tuple[Any, list[Any]]:
    refused = refusal(ids)
    if refused is not None:
        return figures.empty_figure(refused), [html.Li(refused, className="error")]
    client = api()
    try:
        infos = parallel(*[lambda i=i: client.run(i) for i in ids or []])
        keys = parallel(*[lambda i=i: client.keys(i) for i in ids or []])
        hists, skip = parallel(lambda: _histograms(client, infos, keys), lambda: on_policy(client, infos, keys))
    except ApiError as exc:
        return figures.empty_figure(str(exc)), [html.Li(str(exc), className="error")]
    fig, curves = distance_figure(hists, infos, float(threshold or 0.0), skip)
    return fig, _parting_text(curves)
