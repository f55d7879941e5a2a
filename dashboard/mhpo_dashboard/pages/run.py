"""`/runs/<run_id>`: one run, live.

The layout is built from one round of API reads. Afterwards a `dcc.Interval` asks the
server for the run's `last_step` and, only when it moved, fetches the steps after the last
one shown (`start=last_step+1`) and appends them to the charts with `Patch` (no figure is
rebuilt unless a panel gains a new metric). The selected step (the latest one until the
user clicks a point or a flag; "follow latest" returns to it) drives the split histogram,
the outlier tokens and the dotted marker drawn on every chart. When the run's history was
rewound (`last_step` moved back) the charts are rebuilt from the server. Rewinds and forks
are listed under "History", and a fork links its parent.

Under the title, the entropy budget: how many optimizer steps until the policy entropy would fall
under a quarter of its early level at its present trend (`GET /api/v1/runs/{id}/forecast`, read
once when the page loads and once per refresh that brought new steps).

A run that logs sampler-vs-trainer statistics (`mismatch/*`) also gets the "Sampler vs trainer"
panel (gap, IS ratio band, ESS, divergences; live like the others) and, when it logs the
`mismatch` histogram, its step x bin heat-map (drawn when the page loads).

The ratio and hazard charts show off-policy steps only by default (an on-policy step's
log-ratio is exactly 0, so its points only make the curves zig-zag). The key explorer adds
any logged scalar as a chart of its own; the chosen keys are kept per run in the browser's
local storage. Scalars are read in requests of a few hundred keys (`ApiClient.scalars`),
and a "*" pattern adds at most `figures.WILDCARD_CAP` keys to a default panel, so a run
with thousands of keys draws like any other.
"""

from __future__ import annotations

import json
from typing import Any

import dash
from dash import ALL, Input, Output, Patch, State, callback, ctx, dcc, html, no_update

from mhpo_dashboard import figures
from mhpo_dashboard.api import ApiClient, ApiError, parallel
from mhpo_dashboard.app import api, refresh_interval_ms

dash.register_page(__name__, path_template="/runs/<run_id>", title="Run · MHPO Monitor", name="Run")

MAX_POINTS = 400  # per series: enough for a ~700-px chart; fewer points draw faster
MAX_HEATMAP_STEPS = 500
HEATMAP_KEY = "log_ratio"
SPLIT_KEYS = ("log_ratio/adv_pos", "log_ratio/adv_neg")
EXPLORER_LIMIT = 60  # keys listed at once; the search narrows the rest
POLICY_OPTIONS = [{"label": "off-policy steps only", "value": "off"}, {"label": "all steps", "value": "all"}]


def _graph(name: str, figure: Any) -> dcc.Graph:
    return dcc.Graph(
        id={"type": "run-graph", "name": name},
        figure=figure,
        config={"displaylogo": False},
        className=f"graph graph-{name}",
    )


def _panel_data(
    client: ApiClient,
    run_id: str,
    scalar_keys: list[str],
    start: int | None = None,
    end: int | None = None,
    policy: str = "off",
) -> tuple[dict[str, list[list[str]]], dict[str, Any]]:
    """The default panels' rows and series; with `policy == "off"` the ratio and hazard rows lose
    their on-policy steps."""
    rows = {name: figures.panel_rows(name, scalar_keys) for name in figures.PANELS}
    wanted = sorted({k for panel in rows.values() for row in panel for k in row})
    indicators = [k for k in figures.POLICY_KEYS if k in scalar_keys and k not in wanted]
    data = client.scalars(run_id, wanted + indicators, start=start, end=end, max_points=MAX_POINTS)
    if policy == "off":
        filtered = [k for name in figures.POLICY_FILTERED_PANELS for row in rows[name] for k in row]
        data["series"] = figures.off_policy_only(data["series"], filtered, figures.on_policy_steps(data["series"]))
    return rows, data


def _histogram_or_none(client: ApiClient, run_id: str, key: str, have: list[str], **params: Any) -> dict | None:
    return client.histograms(run_id, key, **params) if key in have else None


def selected_step_views(
    client: ApiClient, run: dict[str, Any], step: int | None, hist_keys: list[str]
) -> tuple[Any, list[Any]]:
    """The split histogram figure and the outlier table of one step."""
    if step is None:
        return figures.step_histogram_figure(None, None, None, run.get("loss")), [html.P("no step logged yet")]
    run_id = run["run_id"]
    pos, neg, outliers = parallel(
        *[lambda k=k: _histogram_or_none(client, run_id, k, hist_keys, start=step, end=step) for k in SPLIT_KEYS],
        lambda: client.outliers(run_id, step),
    )
    if pos is None and neg is None:
        pos = _histogram_or_none(client, run_id, HEATMAP_KEY, hist_keys, start=step, end=step)
    fig = figures.step_histogram_figure(pos, neg, step, run.get("loss"), figures.loss_hparams(run.get("config")))
    return fig, _outlier_table(outliers.get("step"), outliers.get("outliers", []))


def _outlier_table(step: int | None, outliers: list[dict[str, Any]]) -> list[Any]:
    rows = figures.outlier_rows(outliers)
    if not rows:
        return [html.P("no outlier tokens logged at or before this step")]
    header = html.Tr([html.Th(c) for c in rows[0]])
    body = [html.Tr([html.Td(str(v)) for v in row.values()]) for row in rows]
    return [
        html.P(f"top tokens by |x| at step {step}"),
        html.Table([html.Thead(header), html.Tbody(body)], className="table outliers"),
    ]


def _event_id(event: dict[str, Any]) -> str:
    """Flags and alerts have separate id sequences; the type keeps them apart."""
    return f"{event.get('type', 'flag')}-{event.get('id')}"


HISTORY_TYPES = ("rewind", "fork")


def _history_list(events: list[dict[str, Any]]) -> list[Any]:
    """Rewinds and forks of the run, oldest first, each fork linking the other run."""
    items = _history_items(events)
    return [html.Ul(items, className="history-list")] if items else [html.P("no rewinds or forks")]


def _history_items(events: list[dict[str, Any]]) -> list[Any]:
    found = sorted((e for e in events if e.get("type") in HISTORY_TYPES), key=lambda e: e.get("created_at") or 0.0)
    items = []
    for e in found:
        evidence = e.get("evidence") or {}
        other = evidence.get("child_run_id") or evidence.get("parent_run_id")
        link: list[Any] = (
            [
                " · ",
                dcc.Link(
                    f"open {'fork' if 'child_run_id' in evidence else 'parent'} run",
                    href=f"/runs/{other}",
                    className="history-link",
                ),
            ]
            if other
            else []
        )
        items.append(
            html.Li(
                [html.Strong(f"step {e.get('step')} · {e.get('type')}"), html.Span(f" {e.get('message', '')}"), *link],
                className=f"history {e.get('type')}",
            )
        )
    return items


def _flag_list(events: list[dict[str, Any]]) -> list[Any]:
    items = _flag_items(events)
    return [html.Ul(items, className="flags")] if items else [html.P("no flags or alerts")]


def _appended(shown: int, items: list[Any], whole: list[Any]) -> Any:
    """A list's live update: `whole` replaces the empty-list hint, else the new items are appended (`Patch`)."""
    if not items:
        return no_update
    if not shown:
        return whole
    patch = Patch()
    patch[0]["props"]["children"].extend(items)
    return patch


def _flag_items(events: list[dict[str, Any]]) -> list[Any]:
    """One line per flag or alert, its severity in words (an informational flag says it is not an alarm);
    the message is the server's."""
    events = [e for e in events if e.get("type") not in HISTORY_TYPES]
    items = []
    for e in sorted(events, key=lambda e: (e.get("step") or 0, str(e.get("id")))):
        kind = e.get("rule_name") if e.get("type") == "alert" else e.get("kind")
        severity = figures.severity_text(e.get("severity", ""))
        items.append(
            html.Li(
                [
                    html.Button(
                        f"step {e.get('step')} · {e.get('type', 'flag')} {kind or ''} · {severity}",
                        id={"type": "flag-item", "key": _event_id(e), "step": e.get("step") or 0},
                        className=f"flag-button severity-{e.get('severity', 'warning')}",
                        n_clicks=0,
                    ),
                    html.Span(
                        f" {e.get('detector') or 'alert rule'}: {e.get('message', '')}", className="flag-message"
                    ),
                    html.Details(
                        [html.Summary("evidence"), html.Pre(json.dumps(e.get("evidence"), indent=1, default=str))]
                    ),
                ],
                className=f"flag severity-{e.get('severity', 'warning')}",
            )
        )
    return items


def _forecast(client: ApiClient, run_id: str) -> dict[str, Any] | None:
    """The run's entropy forecast; None when the server gives none (an older server, a failed read)."""
    try:
        return client.forecast(run_id)
    except ApiError:
        return None


def _summary(run: dict[str, Any]) -> list[Any]:
    live = figures.is_live(run)
    parent = run.get("parent_run_id")
    return [
        html.H2(f"{run.get('name')}"),
        html.Span(figures.run_facts(run), id="run-facts"),
        html.Span(
            [
                " · forked from ",
                dcc.Link(f"run {parent[:8]}", href=f"/runs/{parent}", id="run-parent-link"),
                f" at step {run.get('fork_step')}",
            ],
            id="run-parent",
        )
        if parent
        else None,
        html.Span(" live" if live else "", className="badge-live" if live else ""),
    ]


def _charts(
    client: ApiClient,
    run: dict[str, Any],
    keys: dict[str, Any],
    events: list[dict[str, Any]],
    selected: int | None,
    policy: str = "off",
) -> tuple[dict[str, Any], dict[str, Any], Any, list[Any]]:
    """Every chart of the run drawn from scratch: figures by name, the page state, the step views."""
    run_id, last_step = run["run_id"], run.get("last_step")
    (rows, data), hist, (step_fig, outlier_table) = parallel(
        lambda: _panel_data(client, run_id, keys.get("scalars", []), end=last_step, policy=policy),
        lambda: _histogram_or_none(
            client, run_id, HEATMAP_KEY, keys.get("histograms", []), end=last_step, max_steps=MAX_HEATMAP_STEPS
        ),
        lambda: selected_step_views(client, run, selected, keys.get("histograms", [])),
    )
    trace_maps: dict[str, dict[str, list[int]]] = {}
    figs = {"heatmap": figures.heatmap_figure(hist, events, selected)}
    for name, panel_rows in rows.items():
        figs[name], trace_maps[name] = figures.timeseries_figure(
            figures.PANEL_TITLES[name], panel_rows, data["series"], events, selected, data.get("downsampled", False)
        )
    has_heatmap = bool(hist and hist.get("step"))
    state = {
        "run_id": run_id,
        "last_step": last_step,
        "trace_maps": trace_maps,
        "policy": policy,
        "panel_keys": {n: [k for r in p for k in r] for n, p in rows.items()},
        "heatmap": has_heatmap,
        "heatmap_bins": figures.occupied_bins(hist) if has_heatmap else None,
        "event_ids": [_event_id(e) for e in events],
        "flags_shown": len(_flag_items(events)),
        "history_shown": len(_history_items(events)),
    }
    return figs, state, step_fig, outlier_table


def layout(run_id: str | None = None, **_: Any) -> Any:
    if not run_id:
        return html.P("no run id in the address; pick a run on the runs page")
    client = api()
    try:
        run, keys, answer, forecast = parallel(
            lambda: client.run(run_id),
            lambda: client.keys(run_id),
            lambda: client.events_after(run_id, ""),
            lambda: _forecast(client, run_id),
        )
    except ApiError as exc:
        return html.Div([html.H2("Run not available"), html.P(str(exc), className="error")])
    last_step, events = run.get("last_step"), answer["events"]
    figs, state, step_fig, outlier_table = _charts(client, run, keys, events, last_step)
    state["event_cursor"] = answer["cursor"]
    graphs = {name: _graph(name, fig) for name, fig in figs.items() if name != "heatmap"}
    live_ms = refresh_interval_ms()
    scalar_keys = keys.get("scalars", [])
    mismatch = _mismatch_section(client, run_id, graphs["mismatch"], scalar_keys, keys.get("histograms", []), events)
    return html.Div(
        [
            html.Div(_summary(run), id="run-summary", className="summary"),
            html.P(figures.entropy_budget_text(forecast), id="run-entropy-budget", className="entropy-budget"),
            html.Div(
                [
                    html.Button("follow latest step", id="run-follow-button", n_clicks=0),
                    html.Span(f"selected step {last_step}", id="run-selected-label"),
                    html.Span("ratio and hazard charts:", className="hint"),
                    dcc.RadioItems(id="run-policy-steps", options=POLICY_OPTIONS, value="off", inline=True),
                ],
                className="toolbar",
            ),
            dcc.Store(id="run-state", data=state),
            dcc.Store(id="run-selected", data={"step": last_step, "follow": True}),
            dcc.Store(id="run-keys", data=scalar_keys),
            dcc.Store(id="run-custom-keys", storage_type="local"),
            dcc.Store(id="run-custom-drawn"),
            dcc.Interval(id="run-live", interval=live_ms, n_intervals=0),
            html.Section(
                [
                    _graph("heatmap", figs["heatmap"]),
                    dcc.Graph(
                        id="run-step-histogram", figure=step_fig, config={"displaylogo": False}, className="graph"
                    ),
                ],
                className="row two",
            ),
            html.Section([graphs["trust_region"], graphs["hazard"]], className="row two"),
            html.Section([graphs["gradients"], graphs["policy"]], className="row two"),
            mismatch,
            html.Section(
                [
                    graphs["training"],
                    html.Div(
                        [
                            html.H3("Key explorer"),
                            html.P(
                                f"{len(scalar_keys)} scalar keys logged. Search by prefix or any part of the name; "
                                "click a key to chart it below (kept for this run in this browser).",
                                className="hint",
                            ),
                            dcc.Input(
                                id="run-key-search",
                                type="search",
                                placeholder="e.g. eval/ or accuracy",
                                value="",
                                debounce=0.3,
                                className="key-search",
                            ),
                            html.Div(_key_list(scalar_keys, ""), id="run-key-list", className="key-list"),
                        ],
                        className="explorer",
                    ),
                ],
                className="row two",
            ),
            html.Section(
                [html.H3("Custom charts"), html.Div(id="run-custom-charts", className="grid")], className="row"
            ),
            html.Section(
                [
                    html.Div([html.H3("Flags and alerts"), html.Div(_flag_list(events), id="run-flags")]),
                    html.Div([html.H3("Outlier tokens"), html.Div(outlier_table, id="run-outliers")]),
                ],
                className="row two",
            ),
            html.Section([html.H3("History"), html.Div(_history_list(events), id="run-history")], className="row"),
        ],
        className="run-page",
    )


def _mismatch_section(
    client: ApiClient,
    run_id: str,
    panel: dcc.Graph,
    scalar_keys: list[str],
    hist_keys: list[str],
    events: list[dict[str, Any]],
) -> html.Section:
    """The "Sampler vs trainer" panel and the `mismatch` heat-map; hidden for a run without `mismatch/*` keys."""
    shown = any(k.startswith("mismatch/") for k in scalar_keys)
    hist = None
    if shown:
        key = figures.MISMATCH_HEATMAP_KEY
        try:
            hist = _histogram_or_none(client, run_id, key, hist_keys, max_steps=MAX_HEATMAP_STEPS)
        except ApiError:
            hist = None
    heatmap = dcc.Graph(
        id="run-mismatch-heatmap",
        figure=figures.heatmap_figure(
            hist,
            events,
            title="sampler-trainer gap d per step",
            key="mismatch",
            value_label="d = old - rollout log-prob",
        ),
        config={"displaylogo": False},
        className="graph",
    )
    return html.Section(
        [panel, heatmap], id="run-mismatch", className="row two", style=None if shown else {"display": "none"}
    )


def _key_list(keys: list[str], query: str) -> list[Any]:
    """The explorer's matches, grouped by prefix; each key is a button that adds its chart."""
    groups, total = figures.key_groups(keys, query, EXPLORER_LIMIT)
    if not total:
        return [html.P(f"no logged key matches {query!r}" if query else "no scalar keys logged yet")]
    out: list[Any] = [
        html.P(
            f"{total} matching keys"
            + (f", first {EXPLORER_LIMIT} shown: refine the search" if total > EXPLORER_LIMIT else ""),
            id="run-key-count",
        )
    ]
    for prefix, shown, count in groups:
        buttons = [html.Button(k, id={"type": "key-add", "key": k}, n_clicks=0, className="key-button") for k in shown]
        more = [html.Span(f" +{count - len(shown)} more", className="hint")] if count > len(shown) else []
        out.append(
            html.Details(
                [html.Summary(f"{prefix} ({count})"), *buttons, *more],
                open=len(groups) <= 4 or bool(query),
                className="key-group",
            )
        )
    return out


@callback(
    Output("run-key-list", "children", allow_duplicate=True),
    Input("run-key-search", "value"),
    State("run-keys", "data"),
    prevent_initial_call=True,
)
def search_keys(query: str | None, keys: list[str]) -> list[Any]:
    return _key_list(keys or [], query or "")


@callback(
    Output("run-keys", "data"),
    Output("run-key-list", "children", allow_duplicate=True),
    Input("run-state", "data"),
    State("run-keys", "data"),
    State("run-key-search", "value"),
    prevent_initial_call=True,
)
def new_keys(state: dict[str, Any], known: list[str], query: str | None) -> tuple[Any, Any]:
    """Keys a live run starts logging join the explorer without a reload."""
    try:
        keys = api().keys(state["run_id"]).get("scalars", [])
    except ApiError:
        return no_update, no_update
    if set(keys) == set(known or []):
        return no_update, no_update
    return keys, _key_list(keys, query or "")


@callback(
    Output("run-custom-keys", "data"),
    Input({"type": "key-add", "key": ALL}, "n_clicks"),
    Input({"type": "key-remove", "key": ALL}, "n_clicks"),
    State("run-custom-keys", "data"),
    State("run-state", "data"),
    prevent_initial_call=True,
)
def choose_keys(_add: list[Any], _remove: list[Any], chosen: dict[str, list[str]] | None, state: dict[str, Any]) -> Any:
    """Adding or removing a custom chart; the list is kept per run id."""
    trigger = ctx.triggered_id
    if not isinstance(trigger, dict) or not (ctx.triggered and ctx.triggered[0]["value"]):
        return no_update
    chosen = dict(chosen or {})
    keys = [k for k in chosen.get(state["run_id"], []) if k != trigger["key"]]
    if trigger["type"] == "key-add":
        keys.append(trigger["key"])
    chosen[state["run_id"]] = keys
    return chosen


@callback(
    Output("run-custom-charts", "children"),
    Output("run-custom-drawn", "data"),
    Input("run-custom-keys", "data"),
    State("run-state", "data"),
)
def custom_charts(chosen: dict[str, list[str]] | None, state: dict[str, Any]) -> tuple[list[Any], Any]:
    """One chart per chosen key, drawn when the choice changes; a live update appends to them."""
    keys = (chosen or {}).get(state["run_id"], [])
    if not keys:
        return [html.P("none yet: pick keys in the key explorer above", id="run-custom-empty", className="hint")], None
    try:
        figs, drawn = _custom_figures(api(), state, keys)
    except ApiError as exc:
        return [html.P(str(exc), className="error")], None
    return [
        html.Div(
            [
                html.Button("remove", id={"type": "key-remove", "key": key}, n_clicks=0, className="remove-chart"),
                dcc.Graph(
                    id={"type": "custom-graph", "key": key},
                    figure=figs[key],
                    config={"displaylogo": False},
                    className="graph custom-graph",
                ),
            ],
            className="custom-chart",
        )
        for key in keys
    ], drawn


def _custom_figures(client: ApiClient, state: dict[str, Any], keys: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The custom charts' figures up to the run's last step, and what was drawn (for the live appends)."""
    data, answer = parallel(
        lambda: client.scalars(state["run_id"], keys, end=state.get("last_step"), max_points=MAX_POINTS),
        lambda: client.events_after(state["run_id"], ""),
    )
    events = answer["events"]
    figs, maps = {}, {}
    for key in keys:
        figs[key], maps[key] = figures.timeseries_figure(
            key, [[key]], data["series"], events, None, data.get("downsampled", False)
        )
    drawn = {"last_step": state.get("last_step"), "trace_maps": maps, "event_ids": [_event_id(e) for e in events]}
    return figs, {**drawn, "event_cursor": answer["cursor"]}


@callback(
    Output({"type": "custom-graph", "key": ALL}, "figure"),
    Output("run-custom-drawn", "data", allow_duplicate=True),
    Input("run-state", "data"),
    State("run-custom-drawn", "data"),
    State({"type": "custom-graph", "key": ALL}, "id"),
    prevent_initial_call=True,
)
def extend_custom_charts(
    state: dict[str, Any], drawn: dict[str, Any] | None, ids: list[dict[str, str]]
) -> tuple[list[Any], Any]:
    """New points and events of a live run appended to the custom charts (`Patch`), so they keep their
    zoom; redrawn whole only after a rewind."""
    keys = [i["key"] for i in ids]
    last, new_last = (drawn or {}).get("last_step"), state.get("last_step")
    if not keys or drawn is None or new_last is None or new_last == last:
        return [no_update] * len(keys), no_update
    client = api()
    try:
        if last is None or new_last < last or set(keys) != set(drawn["trace_maps"]):
            figs, new_drawn = _custom_figures(client, state, keys)
            return [figs[k] for k in keys], new_drawn
        data, answer = parallel(
            lambda: client.scalars(state["run_id"], keys, start=last + 1, end=new_last, max_points=MAX_POINTS),
            lambda: client.events_after(state["run_id"], drawn.get("event_cursor")),
        )
        if answer["reset"]:
            figs, new_drawn = _custom_figures(client, state, keys)
            return [figs[k] for k in keys], new_drawn
    except ApiError:
        return [no_update] * len(keys), no_update
    new_events = _unseen(answer["events"], drawn["event_ids"])
    out = [_append_patch(drawn["trace_maps"][key], [[key]], data["series"], new_events) for key in keys]
    seen = drawn["event_ids"] + [_event_id(e) for e in new_events]
    return out, {**drawn, "last_step": new_last, "event_ids": seen, "event_cursor": answer["cursor"]}


def _unseen(events: list[dict[str, Any]], seen: list[str]) -> list[dict[str, Any]]:
    """Events not shown yet (an incremental read may repeat a recent one)."""
    held = set(seen)
    return [e for e in events if _event_id(e) not in held]


@callback(
    Output({"type": "run-graph", "name": ALL}, "figure", allow_duplicate=True),
    Output("run-state", "data", allow_duplicate=True),
    Input("run-policy-steps", "value"),
    State("run-state", "data"),
    State("run-selected", "data"),
    prevent_initial_call=True,
)
def switch_policy(policy: str, state: dict[str, Any], selected: dict[str, Any]) -> tuple[Any, ...]:
    """Redraw the ratio and hazard charts with or without their on-policy steps."""
    names = _graph_names()
    client = api()
    run_id = state["run_id"]
    try:
        keys, events = parallel(lambda: client.keys(run_id), lambda: client.events(run_id))
        rows, data = _panel_data(client, run_id, keys.get("scalars", []), end=state.get("last_step"), policy=policy)
    except ApiError:
        return [no_update] * len(names), no_update
    out: list[Any] = []
    for name in names:
        if name not in figures.POLICY_FILTERED_PANELS:
            out.append(no_update)
            continue
        fig, state["trace_maps"][name] = figures.timeseries_figure(
            figures.PANEL_TITLES[name],
            rows[name],
            data["series"],
            events,
            selected.get("step"),
            data.get("downsampled", False),
        )
        state["panel_keys"][name] = [k for r in rows[name] for k in r]
        out.append(fig)
    state["policy"] = policy
    return out, state


def _graph_names() -> list[str]:
    """Names of the charts matched by this callback's `{"type": "run-graph", "name": ALL}` output."""
    matched = next(o for o in ctx.outputs_list if isinstance(o, list))
    return [o["id"]["name"] for o in matched]


def _append_patch(
    trace_map: dict[str, list[int]], rows: list[list[str]], series: dict[str, Any], new_events: list[dict[str, Any]]
) -> Patch:
    """A time-series chart's live update: the new points, NaN bands and flags, appended (nothing redrawn)."""
    patch = Patch()
    for index, (xs, ys) in figures.series_extension(trace_map, series).items():
        patch["data"][index]["x"].extend(xs)
        patch["data"][index]["y"].extend(ys)
    nan_marks = figures.nan_shapes(rows, series)
    if nan_marks:
        patch["layout"]["shapes"].extend(nan_marks)
    if new_events:
        _events_patch(patch, new_events, trace_map, rows, series)
    return patch


def _events_patch(
    patch: Patch,
    new_events: list[dict[str, Any]],
    trace_map: dict[str, list[int]],
    rows: list[list[str]],
    series: dict[str, Any],
) -> None:
    """Flag lines for new events, and markers on the flagged curves (placed as in the full figure: alarms
    and informational flags each on their own traces)."""
    patch["layout"]["shapes"].extend(figures.event_shapes(new_events))
    for index, (steps, ys, texts, colours) in figures.marker_extension(trace_map, rows, series, new_events).items():
        patch["data"][index]["x"].extend(steps)
        patch["data"][index]["y"].extend(ys)
        patch["data"][index]["hovertext"].extend(texts)
        if colours is not None:
            patch["data"][index]["marker"]["color"].extend(colours)


@callback(
    Output({"type": "run-graph", "name": ALL}, "figure", allow_duplicate=True),
    Output("run-state", "data", allow_duplicate=True),
    Output("run-flags", "children"),
    Output("run-history", "children"),
    Output("run-summary", "children"),
    Output("run-selected", "data", allow_duplicate=True),
    Output("run-entropy-budget", "children"),
    Input("run-live", "n_intervals"),
    State("run-state", "data"),
    State("run-selected", "data"),
    prevent_initial_call=True,
)
def refresh(_: int, state: dict[str, Any], selected: dict[str, Any]) -> tuple[Any, ...]:
    """Append what arrived since `state["last_step"]` and the events newer than `state["event_cursor"]`, and
    read the entropy budget again; nothing is sent back when nothing changed, and a rewind redraws everything."""
    names = _graph_names()
    client = api()
    run_id = state["run_id"]
    try:
        run = client.run(run_id)
    except ApiError:
        return [no_update] * len(names), no_update, no_update, no_update, no_update, no_update, no_update
    last, new_last = state.get("last_step"), run.get("last_step")
    if last is not None and (new_last is None or new_last < last):  # rewound: redraw from the server
        return _redraw(client, run, state, names, client.events_after(run_id, ""))
    if new_last is None or (last is not None and new_last <= last):
        return [no_update] * len(names), no_update, no_update, no_update, _summary(run), no_update, no_update
    start = None if last is None else last + 1
    policy = state.get("policy", "off")
    keys, answer, forecast = parallel(
        lambda: client.keys(run_id),
        lambda: client.events_after(run_id, state.get("event_cursor")),
        lambda: _forecast(client, run_id),
    )
    if answer["reset"]:  # rewound, then logged past the old last step
        return _redraw(client, run, state, names, answer)
    new_events = _unseen(answer["events"], state["event_ids"])
    has_heatmap = HEATMAP_KEY in keys.get("histograms", [])
    (rows, data), hist = parallel(
        lambda: _panel_data(client, run_id, keys.get("scalars", []), start=start, end=new_last, policy=policy),
        lambda: (
            client.histograms(
                run_id,
                HEATMAP_KEY,
                start=start if state["heatmap"] else None,
                end=new_last,
                max_steps=MAX_HEATMAP_STEPS,
            )
            if has_heatmap
            else None
        ),
    )
    grown = [n for n in rows if [k for r in rows[n] for k in r] != state["panel_keys"].get(n)]
    redrawn = bool(grown) or (hist is not None and not state["heatmap"])
    everything: list[dict[str, Any]] = client.events(run_id) if redrawn else []  # a chart drawn whole shows them all
    full = _panel_data(client, run_id, keys.get("scalars", []), end=new_last, policy=policy)[1] if grown else None
    out = []
    for name in names:
        if name == "heatmap":
            out.append(_heatmap_update(state, hist, everything, new_events, selected))
        elif name in grown:
            assert full is not None  # read above whenever a panel grew
            fig, state["trace_maps"][name] = figures.timeseries_figure(
                figures.PANEL_TITLES[name],
                rows[name],
                full["series"],
                everything,
                selected.get("step"),
                full.get("downsampled", False),
            )
            state["panel_keys"][name] = [k for r in rows[name] for k in r]
            out.append(fig)
        else:
            out.append(_append_patch(state["trace_maps"][name], rows[name], data["series"], new_events))
    flags, history = _flag_items(new_events), _history_items(new_events)
    flag_update = _appended(state.get("flags_shown", 0), flags, _flag_list(new_events))
    history_update = _appended(state.get("history_shown", 0), history, _history_list(new_events))
    state["flags_shown"] = state.get("flags_shown", 0) + len(flags)
    state["history_shown"] = state.get("history_shown", 0) + len(history)
    state["last_step"] = new_last
    state["event_ids"] = state["event_ids"] + [_event_id(e) for e in new_events]
    state["event_cursor"] = answer["cursor"]
    follow = selected if not selected.get("follow") else {"step": new_last, "follow": True}
    return out, state, flag_update, history_update, _summary(run), follow, figures.entropy_budget_text(forecast)


def _redraw(
    client: ApiClient, run: dict[str, Any], state: dict[str, Any], names: list[str], answer: dict[str, Any]
) -> tuple[Any, ...]:
    """Every chart and list drawn again from the server (after a rewind), following the latest step."""
    keys, forecast = parallel(lambda: client.keys(run["run_id"]), lambda: _forecast(client, run["run_id"]))
    events, new_last = answer["events"], run.get("last_step")
    figs, new_state = _charts(client, run, keys, events, new_last, state.get("policy", "off"))[:2]
    new_state["event_cursor"] = answer["cursor"]
    return (
        [figs[name] for name in names],
        new_state,
        _flag_list(events),
        _history_list(events),
        _summary(run),
        {"step": new_last, "follow": True},
        figures.entropy_budget_text(forecast),
    )


def _heatmap_update(
    state: dict[str, Any],
    hist: dict[str, Any] | None,
    events: list[dict],
    new_events: list[dict],
    selected: dict[str, Any],
) -> Any:
    """The whole heat-map the first time a histogram exists, afterwards only the new rows."""
    if hist is None:
        return no_update
    if not state["heatmap"]:
        state["heatmap"] = bool(hist.get("step"))
        state["heatmap_bins"] = figures.occupied_bins(hist) if state["heatmap"] else None
        return figures.heatmap_figure(hist, events, selected.get("step")) if state["heatmap"] else no_update
    steps, z = figures.heatmap_columns(hist)
    patch = Patch()
    if steps:
        patch["data"][0]["x"].extend(steps)
        patch["data"][0]["z"].extend(z)
        used = figures.occupied_bins(hist, state.get("heatmap_bins"))
        if used != state.get("heatmap_bins"):
            state["heatmap_bins"] = used
            patch["layout"]["yaxis"]["range"] = figures.occupied_range(hist, used)
    if new_events:
        patch["layout"]["shapes"].extend(figures.event_shapes(new_events))
    return patch


@callback(
    Output("run-selected", "data", allow_duplicate=True),
    Input({"type": "run-graph", "name": ALL}, "clickData"),
    Input({"type": "flag-item", "key": ALL, "step": ALL}, "n_clicks"),
    Input("run-follow-button", "n_clicks"),
    State("run-state", "data"),
    prevent_initial_call=True,
)
def select_step(_clicks: list[Any], _flags: list[Any], _follow: int, state: dict[str, Any]) -> Any:
    """A click on any chart point or flag selects that step; "follow latest" goes back to live."""
    trigger = ctx.triggered_id
    value = ctx.triggered[0]["value"] if ctx.triggered else None
    if not value:
        return no_update
    if trigger == "run-follow-button":
        return {"step": state.get("last_step"), "follow": True}
    if isinstance(trigger, dict) and trigger.get("type") == "flag-item":
        return {"step": int(trigger["step"]), "follow": False}
    points = value.get("points") or []
    if not points or points[0].get("x") is None:
        return no_update
    return {"step": round(float(points[0]["x"])), "follow": False}


@callback(
    Output("run-step-histogram", "figure"),
    Output("run-outliers", "children"),
    Output("run-selected-label", "children"),
    Output({"type": "run-graph", "name": ALL}, "figure", allow_duplicate=True),
    Input("run-selected", "data"),
    State("run-state", "data"),
    State("run-step-histogram", "figure"),
    prevent_initial_call=True,
)
def show_selected(selected: dict[str, Any], state: dict[str, Any], current: dict[str, Any]) -> tuple[Any, ...]:
    """Redraw the step views and move the dotted marker on every chart."""
    names = _graph_names()
    step = selected.get("step")
    title = ((current or {}).get("layout", {}).get("title") or {}).get("text", "")
    label = f"selected step {step}" + (" (following the latest)" if selected.get("follow") else "")
    if step is not None and title.startswith(f"step {step}:"):
        return no_update, no_update, label, [no_update] * len(names)
    client = api()
    try:
        run = client.run(state["run_id"])
        keys = client.keys(state["run_id"])
        fig, table = selected_step_views(client, run, step, keys.get("histograms", []))
    except ApiError as exc:
        return no_update, [html.P(str(exc), className="error")], label, [no_update] * len(names)
    moves = []
    for _ in names:
        patch = Patch()
        patch["layout"]["shapes"][figures.SELECTION_SHAPE]["x0"] = step
        patch["layout"]["shapes"][figures.SELECTION_SHAPE]["x1"] = step
        patch["layout"]["shapes"][figures.SELECTION_SHAPE]["visible"] = step is not None
        moves.append(patch)
    return fig, table, label, moves
