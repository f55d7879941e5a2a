"""`/compare?runs=<id>,<id>[,...]`: two or more runs on one shared step axis.

Shows the chosen metrics overlaid, the log-ratio heat-maps side by side, the per-step
Wasserstein-1 distance of each run's log-ratio distribution to the first run's (and the
first step where it exceeds the threshold: where the runs part), and the config keys whose
values differ. Histograms are fetched with the same step range and bucket budget for every
run, so the server's bucketing lines up and the distances compare like with like. Steps
where either run was on-policy (all log-ratios exactly 0) are left out of the distance: both
distributions are then the same point mass and the distance says nothing.

While any of the runs is live the page polls like the run page: per run, the steps after the
last one drawn (`start=last_step+1`) and the events after its events cursor, appended to the
metric charts and the flag list with `Patch`; it stops polling once none is live. A rewind of
any run redraws the charts and the list. The heat-maps, the distance chart and the config
differences are drawn when the page loads (the threshold box redraws the distance).

Its cost is bounded whatever the URL holds: at most `max_compare_runs()` runs (a longer list
is refused on the page before anything is read) and the per-run reads go through
`parallel`'s small pool.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import dash
from dash import ALL, Input, Output, Patch, State, callback, ctx, dash_table, dcc, html, no_update

from mhpo_dashboard import figures
from mhpo_dashboard.api import ApiClient, ApiError, parallel
from mhpo_dashboard.app import api, max_compare_runs, refresh_interval_ms

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


def _metric_series(
    client: ApiClient, runs: list[dict[str, Any]], metrics: list[str], starts: dict[str, int | None] | None = None
) -> dict[str, dict[str, Any]]:
    """Each run's series of `metrics` up to its last step (from `starts[run_id]` when given); ratio and
    hazard metrics without the run's on-policy steps (as on the run page)."""
    wanted = list(dict.fromkeys([*metrics, *figures.POLICY_KEYS]))
    starts = starts or {}
    fetched = parallel(
        *[
            lambda r=r: client.scalars(
                r["run_id"], wanted, start=starts.get(r["run_id"]), end=r.get("last_step"), max_points=MAX_POINTS
            )
            for r in runs
        ]
    )
    filtered = [m for m in metrics if m.startswith(("ratio/", "hazard/"))]
    return {
        r["run_id"]: figures.off_policy_only(f["series"], filtered, figures.on_policy_steps(f["series"]))
        for r, f in zip(runs, fetched, strict=True)
    }


def metric_figures(
    client: ApiClient, runs: list[dict[str, Any]], metrics: list[str]
) -> tuple[list[Any], dict[str, dict[str, int]]]:
    """One chart per metric, and per metric the trace index of each run drawn in it (for the live appends)."""
    data = _metric_series(client, runs, metrics)
    x_range = _x_range(runs)
    graphs, traces = [], {}
    for m in metrics:
        per_run = [(r, data[r["run_id"]].get(m)) for r in runs]
        drawn = [r["run_id"] for r, series in per_run if series and series["step"]]
        traces[m] = {run_id: i for i, run_id in enumerate(drawn)}
        graphs.append(
            dcc.Graph(
                id={"type": "compare-metric", "metric": m},
                figure=figures.compare_metric_figure(m, per_run, x_range),
                className="graph compare-metric",
            )
        )
    return graphs, traces


def _live_state(
    runs: list[dict[str, Any]], traces: dict[str, dict[str, int]], answers: list[dict[str, Any]]
) -> dict[str, Any]:
    """What the poll needs: per run its last step drawn, events cursor and the events shown."""
    return {
        "runs": [
            {
                "run_id": r["run_id"],
                "last_step": r.get("last_step"),
                "cursor": a["cursor"],
                "event_ids": [_event_id(e) for e in a["events"]],
            }
            for r, a in zip(runs, answers, strict=True)
        ],
        "traces": traces,
        "events_shown": sum(len(a["events"]) for a in answers),
    }


def _event_id(event: dict[str, Any]) -> str:
    return f"{event.get('type', 'flag')}-{event.get('id')}"


def _event_items(run: dict[str, Any], events: list[dict[str, Any]]) -> list[Any]:
    """One line per flag, alert, rewind or fork of one run, in step order."""
    label = figures.run_label(run)
    return [
        html.Li(
            [
                html.Strong(f"{label} · step {e.get('step')} · {e.get('type', 'flag')} "),
                html.Span(
                    f"{e.get('rule_name') or e.get('kind') or ''} ({figures.severity_text(e.get('severity', ''))}): "
                ),
                html.Span(str(e.get("message", ""))),
            ],
            className=f"compare-event severity-{e.get('severity', 'warning')}",
        )
        for e in sorted(events, key=lambda e: (e.get("step") or 0, str(e.get("id"))))
    ]


def _event_list(items: list[Any]) -> list[Any]:
    return [html.Ul(items, className="compare-events")] if items else [html.P("no flags or alerts")]


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
        hists, mm_hists, (metric_graphs, traces), skip, answers = parallel(
            lambda: _histograms(client, infos, keys),
            lambda: _histograms(client, infos, keys, mm_key),
            lambda: metric_figures(client, infos, metrics),
            lambda: on_policy(client, infos, keys),
            lambda: parallel(*[lambda i=i: client.events_after(i, "") for i in ids]),
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
            dcc.Store(id="compare-live", data=_live_state(infos, traces, answers)),
            dcc.Interval(
                id="compare-tick",
                interval=refresh_interval_ms(),
                disabled=not any(figures.is_live(r) for r in infos),
            ),
            html.Div(
                [
                    html.Label("metrics "),
                    dcc.Dropdown(id="compare-metrics", options=scalar_keys, value=metrics, multi=True),
                ],
                className="toolbar",
            ),
            html.Div(metric_graphs, id="compare-metric-graphs", className="grid"),
            html.H3("flags and alerts"),
            html.Div(
                _event_list([i for r, a in zip(infos, answers, strict=True) for i in _event_items(r, a["events"])]),
                id="compare-events",
            ),
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
    Output("compare-live", "data", allow_duplicate=True),
    Input("compare-metrics", "value"),
    State("compare-runs", "data"),
    State("compare-live", "data"),
    prevent_initial_call=True,
)
def change_metrics(
    metrics: list[str] | None, ids: list[str] | None, live: dict[str, Any] | None
) -> tuple[list[Any], Any]:
    """The metric charts drawn again up to the steps the page holds, so the live appends continue from there."""
    refused = refusal(ids)
    if refused is not None:
        return [html.P(refused, className="error")], no_update
    client = api()
    held = {r["run_id"]: r["last_step"] for r in (live or {}).get("runs", [])}
    try:
        infos = parallel(*[lambda i=i: client.run(i) for i in ids or []])
        graphs, traces = metric_figures(
            client, [{**r, "last_step": held.get(r["run_id"], r.get("last_step"))} for r in infos], metrics or []
        )
    except ApiError as exc:
        return [html.P(str(exc), className="error")], no_update
    return graphs, no_update if live is None else {**live, "traces": traces}


@callback(
    Output({"type": "compare-metric", "metric": ALL}, "figure"),
    Output("compare-live", "data", allow_duplicate=True),
    Output("compare-events", "children"),
    Output("compare-tick", "disabled"),
    Input("compare-tick", "n_intervals"),
    State("compare-live", "data"),
    State({"type": "compare-metric", "metric": ALL}, "relayoutData"),
    prevent_initial_call=True,
)
def poll(_: int, live: dict[str, Any] | None, zooms: list[dict[str, Any] | None]) -> tuple[Any, ...]:
    """Per run, the steps after the last one drawn and the events after its cursor, appended (`Patch`);
    a rewind of any run redraws the charts and the list; polling stops once no run is live."""
    metrics = [o["id"]["metric"] for o in next(o for o in ctx.outputs_list if isinstance(o, list))]
    unchanged = [no_update] * len(metrics)
    if not live:
        return unchanged, no_update, no_update, True
    client = api()
    try:
        infos = parallel(*[lambda r=r: client.run(r["run_id"]) for r in live["runs"]])
    except ApiError:
        return unchanged, no_update, no_update, no_update
    stop = not any(figures.is_live(r) for r in infos)
    held = {r["run_id"]: r for r in live["runs"]}
    moved = [r for r in infos if _advanced(held[r["run_id"]]["last_step"], r.get("last_step"))]
    rewound = any(_rewound(held[r["run_id"]]["last_step"], r.get("last_step")) for r in infos)
    if not moved and not rewound:
        return unchanged, no_update, no_update, stop
    try:
        if rewound:
            return (*_redrawn(client, infos, metrics), stop)
        starts = {r["run_id"]: _next_step(held[r["run_id"]]["last_step"]) for r in moved}
        data, answers = parallel(
            lambda: _metric_series(client, moved, metrics, starts),
            lambda: parallel(
                *[lambda r=r: client.events_after(r["run_id"], held[r["run_id"]]["cursor"]) for r in moved]
            ),
        )
        if any(a["reset"] for a in answers):
            return (*_redrawn(client, infos, metrics), stop)
    except ApiError:
        return unchanged, no_update, no_update, no_update
    figs = [
        _metric_patch(m, infos, moved, data, live["traces"].setdefault(m, {}), _zoomed(zoom))
        for m, zoom in zip(metrics, zooms, strict=True)
    ]
    items: list[Any] = []
    for run, answer in zip(moved, answers, strict=True):
        state = held[run["run_id"]]
        new = [e for e in answer["events"] if _event_id(e) not in set(state["event_ids"])]
        items.extend(_event_items(run, new))
        state.update(
            last_step=run.get("last_step"),
            cursor=answer["cursor"],
            event_ids=state["event_ids"] + [_event_id(e) for e in new],
        )
    events: Any = no_update
    if items:
        events = _event_list(items) if not live["events_shown"] else Patch()
        if live["events_shown"]:
            events[0]["props"]["children"].extend(items)
        live["events_shown"] += len(items)
    return figs, live, events, stop


def _zoomed(relayout: dict[str, Any] | None) -> bool:
    """Whether the user zoomed the step axis (then a live update leaves it where they put it)."""
    keys = set(relayout or {})
    return bool(keys & {"xaxis.range", "xaxis.range[0]", "xaxis.range[1]"}) and "xaxis.autorange" not in keys


def _advanced(held: int | None, now: int | None) -> bool:
    return now is not None and (held is None or now > held)


def _rewound(held: int | None, now: int | None) -> bool:
    return held is not None and (now is None or now < held)


def _next_step(held: int | None) -> int | None:
    return None if held is None else held + 1


def _metric_patch(
    metric: str,
    runs: list[dict[str, Any]],
    moved: list[dict[str, Any]],
    data: dict[str, dict[str, Any]],
    traces: dict[str, int],
    zoomed: bool,
) -> Patch:
    """One metric chart's live update: each moved run's new points appended to its line (a line of its own
    the first time it logs the metric), and the step axis widened to the latest step."""
    patch = Patch()
    for run in moved:
        series = data[run["run_id"]].get(metric)
        if not series or not series["step"]:
            continue
        index = traces.get(run["run_id"])
        if index is None:
            only = [(r, series if r["run_id"] == run["run_id"] else None) for r in runs]
            patch["data"].append(figures.compare_metric_figure(metric, only)["data"][0])
            patch["layout"]["annotations"] = []
            traces[run["run_id"]] = len(traces)
            continue
        new = figures.compare_metric_figure(metric, [(run, series)])["data"][0]
        patch["data"][index]["x"].extend(new["x"])
        patch["data"][index]["y"].extend(new["y"])
    if not zoomed:
        patch["layout"]["xaxis"]["range"] = _x_range(runs)
    return patch


def _redrawn(client: ApiClient, runs: list[dict[str, Any]], metrics: list[str]) -> tuple[list[Any], Any, list[Any]]:
    """The metric charts, the live state and the flag list, all read again (after a rewind)."""
    (graphs, traces), answers = parallel(
        lambda: metric_figures(client, runs, metrics),
        lambda: parallel(*[lambda r=r: client.events_after(r["run_id"], "") for r in runs]),
    )
    items = [i for r, a in zip(runs, answers, strict=True) for i in _event_items(r, a["events"])]
    return [g.figure for g in graphs], _live_state(runs, traces, answers), _event_list(items)


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
