"""`/alerts`: alert rules (create, edit, enable/disable, delete) and fired alerts (acknowledge).

The form mirrors the alert API's rule (`POST /api/v1/alert-rules`): a name, a project, an
optional run, one condition (`threshold` on a scalar for N steps in a row, robust `spike`
of a scalar, or a `flag` of a kind at a severity), severity, cooldown and delivery
channels. Only the fields of the chosen condition type are shown; the flag kinds are the
server's (`GET /api/v1/flag-kinds`). The server validates; its 4xx message (which names the
field) is shown as is. The tables say conditions and severities in words ("info (not an
alarm)", "WARNING", "CRITICAL", coloured as the charts colour flags), times in UTC and link
runs by name. A server without the alert routes (404) gets a notice instead of the page.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, callback, ctx, dash_table, dcc, html, no_update

from mhpo_dashboard.api import ApiClient, ApiError, NotAvailable
from mhpo_dashboard.app import api
from mhpo_dashboard.figures import SEVERITY_COLOURS, alert_rows, rule_rows, severity_text

dash.register_page(__name__, path="/alerts", title="Alerts · MHPO Monitor", name="Alerts", order=2)

ANY_KIND = "*"
SEVERITIES = ["info", "warning", "critical"]
SEVERITY_OPTIONS = [{"label": severity_text(s), "value": s} for s in SEVERITIES]
# The severity column of both tables, coloured as the charts colour flags.
SEVERITY_STYLES = [
    {"if": {"filter_query": f'{{severity}} = "{severity_text(s)}"', "column_id": "severity"}, "color": colour}
    for s, colour in SEVERITY_COLOURS.items()
] + [
    {"if": {"filter_query": f'{{severity}} = "{severity_text(s)}"', "column_id": "severity"}, "fontWeight": "bold"}
    for s in ("warning", "critical")
]
RULE_COLUMNS = [
    ("name", "name"),
    ("project", "project"),
    ("run", "run"),
    ("condition", "condition"),
    ("severity", "severity"),
    ("cooldown", "cooldown"),
    ("channels", "channels"),
    ("enabled", "enabled"),
]
ALERT_COLUMNS = [
    ("time", "fired (UTC)"),
    ("rule_name", "rule"),
    ("run", "run"),
    ("step", "step"),
    ("severity", "severity"),
    ("message", "message"),
    ("acknowledged", "acknowledged (UTC)"),
    ("delivery_status", "delivery"),
]
# Form groups shown per condition type ("key" is shared by threshold and spike).
TYPE_GROUPS = {"key": ("threshold", "spike"), "threshold": ("threshold",), "spike": ("spike",), "flag": ("flag",)}
FORM_FIELDS = [
    "name",
    "project",
    "run_id",
    "type",
    "key",
    "op",
    "value",
    "for_steps",
    "direction",
    "z",
    "kind",
    "min_severity",
    "severity",
    "cooldown_s",
    "channels",
    "webhook_url",
    "enabled",
]
DEFAULTS: dict[str, Any] = {
    "name": "",
    "project": None,
    "run_id": None,
    "type": "threshold",
    "key": "hazard/zeta_p99",
    "op": ">",
    "value": 5.0,
    "for_steps": 1,
    "direction": "up",
    "z": 6.0,
    "kind": "*",
    "min_severity": "warning",
    "severity": "warning",
    "cooldown_s": 600.0,
    "channels": ["dashboard"],
    "webhook_url": "",
    "enabled": ["on"],
}


def _columns(spec: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"id": c, "name": n, **({"presentation": "markdown"} if c == "run" else {})} for c, n in spec]


def rule_body(form: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of a rule from the form's values (fields of other condition types left out)."""
    kind = form["type"]
    if kind == "threshold":
        condition = {
            "type": kind,
            "key": form["key"],
            "op": form["op"],
            "value": form["value"],
            "for_steps": form["for_steps"],
        }
    elif kind == "spike":
        condition = {"type": kind, "key": form["key"], "direction": form["direction"], "z": form["z"]}
    else:
        condition = {"type": kind, "kind": form["kind"], "min_severity": form["min_severity"]}
    return {
        "name": form["name"],
        "project": form["project"],
        "run_id": form["run_id"] or None,
        "condition": condition,
        "severity": form["severity"],
        "cooldown_s": form["cooldown_s"],
        "channels": form["channels"] or ["dashboard"],
        "webhook_url": form["webhook_url"] or None,
        "enabled": "on" in (form["enabled"] or []),
    }


def rule_form(rule: dict[str, Any]) -> dict[str, Any]:
    """Form values showing an existing rule."""
    cond = rule.get("condition") or {}
    values = {
        **DEFAULTS,
        **{k: rule.get(k) for k in ("name", "project", "run_id", "severity", "cooldown_s", "channels", "webhook_url")},
    }
    values.update({k: v for k, v in cond.items() if k in DEFAULTS})
    values["webhook_url"] = values["webhook_url"] or ""
    values["enabled"] = ["on"] if rule.get("enabled") else []
    return values


def _field(label: str, component: Any) -> html.Label:
    return html.Label([html.Span(label), component], className="field")


def _form(projects: list[str], keys: list[str], kinds: list[str]) -> html.Div:
    d = DEFAULTS
    return html.Div(
        [
            _field("name", dcc.Input(id="rule-name", value=d["name"], placeholder="hazard spike")),
            _field(
                "project",
                dcc.Dropdown(
                    id="rule-project", options=projects, value=projects[0] if projects else None, clearable=False
                ),
            ),
            _field(
                "run (empty: every run of the project)", dcc.Input(id="rule-run_id", value="", placeholder="run id")
            ),
            _field(
                "condition",
                dcc.RadioItems(id="rule-type", options=["threshold", "spike", "flag"], value=d["type"], inline=True),
            ),
            html.Div(
                [_field("scalar key", dcc.Dropdown(id="rule-key", options=keys, value=d["key"], clearable=False))],
                id="rule-group-key",
                className="group",
            ),
            html.Div(
                [
                    _field(
                        "op",
                        dcc.Dropdown(
                            id="rule-op", options=[">", ">=", "<", "<=", "==", "!="], value=d["op"], clearable=False
                        ),
                    ),
                    _field("value", dcc.Input(id="rule-value", type="number", value=d["value"])),
                    _field(
                        "for steps in a row", dcc.Input(id="rule-for_steps", type="number", min=1, value=d["for_steps"])
                    ),
                ],
                id="rule-group-threshold",
                className="group",
            ),
            html.Div(
                [
                    _field(
                        "spike direction",
                        dcc.Dropdown(
                            id="rule-direction", options=["up", "down", "both"], value=d["direction"], clearable=False
                        ),
                    ),
                    _field("spike z (robust z-score)", dcc.Input(id="rule-z", type="number", value=d["z"])),
                ],
                id="rule-group-spike",
                className="group",
                style={"display": "none"},
            ),
            html.Div(
                [
                    _field(
                        "flag kind (* = any)",
                        dcc.Dropdown(id="rule-kind", options=[ANY_KIND, *kinds], value=d["kind"], clearable=False),
                    ),
                    _field(
                        "flag min severity",
                        dcc.Dropdown(
                            id="rule-min_severity", options=SEVERITY_OPTIONS, value=d["min_severity"], clearable=False
                        ),
                    ),
                ],
                id="rule-group-flag",
                className="group",
                style={"display": "none"},
            ),
            _field(
                "alert severity",
                dcc.Dropdown(id="rule-severity", options=SEVERITY_OPTIONS, value=d["severity"], clearable=False),
            ),
            _field("cooldown (s)", dcc.Input(id="rule-cooldown_s", type="number", min=0, value=d["cooldown_s"])),
            _field(
                "channels",
                dcc.Checklist(id="rule-channels", options=["dashboard", "webhook"], value=d["channels"], inline=True),
            ),
            html.Div(
                [
                    _field(
                        "webhook URL",
                        dcc.Input(id="rule-webhook_url", value=d["webhook_url"], placeholder="https://..."),
                    )
                ],
                id="rule-group-webhook",
                className="group",
                style={"display": "none"},
            ),
            _field("enabled", dcc.Checklist(id="rule-enabled", options=["on"], value=d["enabled"], inline=True)),
        ],
        className="form",
    )


@callback(
    [Output(f"rule-group-{g}", "style") for g in (*TYPE_GROUPS, "webhook")],
    Input("rule-type", "value"),
    Input("rule-channels", "value"),
)
def show_fields(kind: str, channels: list[str] | None) -> list[dict[str, str]]:
    """Only the fields the chosen condition type (and the webhook channel) uses."""
    shown = [kind in types for types in TYPE_GROUPS.values()] + ["webhook" in (channels or [])]
    return [{"display": "contents"} if on else {"display": "none"} for on in shown]


def _empty(rules: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> tuple[str, str]:
    return (
        'no alert rules yet: fill in the form below and press "create rule"' if not rules else "",
        "no alert has fired" if not alerts else "",
    )


TABLE_STYLE: dict[str, Any] = {
    "style_cell": {
        "textAlign": "left",
        "whiteSpace": "normal",
        "height": "auto",
        "fontSize": "0.85em",
        "padding": "2px 6px",
    },
    "style_table": {"maxWidth": "100%"},
    "markdown_options": {"link_target": "_self"},
}


def _flag_kinds(client: ApiClient) -> list[str]:
    """The server's flag kinds; none from a server that does not list them (the form then offers "*" only)."""
    try:
        return client.flag_kinds()
    except NotAvailable:
        return []


def _load(client: ApiClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return client.alert_rules(), client.alerts()


def layout(**_: Any) -> Any:
    client = api()
    try:
        rules, alerts = _load(client)
        runs = client.runs()
        kinds = _flag_kinds(client)
    except NotAvailable:
        return html.Div(
            [
                html.H2("Alerts"),
                html.P(
                    "Alerts are not available on this server: it does not offer /api/v1/alert-rules "
                    "(HTTP 404). Upgrade the server to a version with the alert API.",
                    id="alerts-unavailable",
                    className="notice",
                ),
            ]
        )
    except ApiError as exc:
        return html.Div([html.H2("Alerts"), html.P(str(exc), className="error")])
    projects = sorted({r["project"] for r in runs})
    names = {r["run_id"]: r["name"] for r in runs}
    keys = sorted({k for r in runs[:20] for k in client.keys(r["run_id"]).get("scalars", [])} | {DEFAULTS["key"]})
    no_rules, no_alerts = _empty(rules, alerts)
    return html.Div(
        [
            html.H2("Alert rules"),
            html.P(no_rules, id="alerts-rules-empty", className="hint"),
            dash_table.DataTable(
                id="alerts-rules",
                data=rule_rows(rules, names),
                columns=_columns(RULE_COLUMNS),
                row_selectable="single",
                selected_rows=[],
                page_size=20,
                style_data_conditional=SEVERITY_STYLES,
                **TABLE_STYLE,
            ),
            html.H3("Rule (select a rule above to edit it)"),
            _form(projects, keys, kinds),
            html.Div(
                [
                    html.Button("create rule", id="alerts-create", n_clicks=0),
                    html.Button("save changes", id="alerts-save", n_clicks=0),
                    html.Button("enable / disable", id="alerts-toggle", n_clicks=0),
                    html.Button("delete rule", id="alerts-delete", n_clicks=0),
                ],
                className="toolbar",
            ),
            html.P(id="alerts-message", className="message"),
            html.H2("Fired alerts"),
            html.P(no_alerts, id="alerts-fired-empty", className="hint"),
            dash_table.DataTable(
                id="alerts-fired",
                data=alert_rows(alerts, names),
                columns=_columns(ALERT_COLUMNS),
                row_selectable="multi",
                selected_rows=[],
                page_size=20,
                style_data_conditional=[
                    {"if": {"filter_query": '{acknowledged} = "no"'}, "fontWeight": "bold"},
                    *SEVERITY_STYLES,
                ],
                **TABLE_STYLE,
            ),
            html.Button("acknowledge selected", id="alerts-ack", n_clicks=0),
            dcc.Interval(id="alerts-refresh", interval=10_000),
        ],
        className="alerts-page",
    )


def _selected_id(rows: list[dict[str, Any]], selected: list[int] | None) -> Any:
    if not selected or selected[0] >= len(rows):
        return None
    return rows[selected[0]].get("id")


@callback(
    [Output(f"rule-{f}", "value") for f in FORM_FIELDS],
    Input("alerts-rules", "selected_rows"),
    State("alerts-rules", "data"),
    prevent_initial_call=True,
)
def edit_selected(selected: list[int] | None, rows: list[dict[str, Any]]) -> list[Any]:
    """Selecting a rule loads it into the form."""
    rule_id = _selected_id(rows, selected)
    rule = next((r for r in api().alert_rules() if r.get("id") == rule_id), None) if rule_id is not None else None
    if rule is None:
        return [no_update] * len(FORM_FIELDS)
    values = rule_form(rule)
    return [values[f] for f in FORM_FIELDS]


@callback(
    Output("alerts-rules", "data"),
    Output("alerts-rules", "selected_rows"),
    Output("alerts-fired", "data"),
    Output("alerts-fired", "selected_rows"),
    Output("alerts-message", "children"),
    Output("alerts-rules-empty", "children"),
    Output("alerts-fired-empty", "children"),
    Input("alerts-create", "n_clicks"),
    Input("alerts-save", "n_clicks"),
    Input("alerts-toggle", "n_clicks"),
    Input("alerts-delete", "n_clicks"),
    Input("alerts-ack", "n_clicks"),
    Input("alerts-refresh", "n_intervals"),
    [State(f"rule-{f}", "value") for f in FORM_FIELDS],
    State("alerts-rules", "data"),
    State("alerts-rules", "selected_rows"),
    State("alerts-fired", "data"),
    State("alerts-fired", "selected_rows"),
    prevent_initial_call=True,
)
def act(*args: Any) -> tuple[Any, ...]:
    """Every button goes through the API, then both tables are re-read so they show the server's truth.

    Arguments: six click counters, the form fields (FORM_FIELDS order), then the tables' state.
    """
    form = dict(zip(FORM_FIELDS, args[6 : 6 + len(FORM_FIELDS)], strict=True))
    rule_table, rule_sel, alert_table, alert_sel = args[6 + len(FORM_FIELDS) :]
    client = api()
    action = ctx.triggered_id
    rule_id = _selected_id(rule_table, rule_sel)
    message: object = no_update
    try:
        if action == "alerts-create":
            created = client.create_alert_rule(rule_body(form))
            message = f"created rule {created['id']} ({created['name']})"
        elif action in {"alerts-save", "alerts-toggle", "alerts-delete"} and rule_id is None:
            message = "select a rule in the table first"
        elif action == "alerts-save":
            body = rule_body(form)
            body.pop("project")
            client.update_alert_rule(rule_id, body)
            message = f"saved rule {rule_id}"
        elif action == "alerts-toggle":
            enabled = next(r for r in rule_table if r.get("id") == rule_id).get("enabled") == "yes"
            client.update_alert_rule(rule_id, {"enabled": not enabled})
            message = f"rule {rule_id} {'disabled' if enabled else 'enabled'}"
        elif action == "alerts-delete":
            client.delete_alert_rule(rule_id)
            message = f"deleted rule {rule_id}"
        elif action == "alerts-ack":
            ids = [alert_table[i]["id"] for i in (alert_sel or []) if i < len(alert_table)]
            for alert_id in ids:
                client.acknowledge_alert(alert_id)
            message = f"acknowledged {len(ids)} alert(s)" if ids else "select fired alerts to acknowledge"
        rules, alerts = _load(client)
        names = {r["run_id"]: r["name"] for r in client.runs()}
    except ApiError as exc:
        return no_update, no_update, no_update, no_update, f"refused by the server: {exc}", no_update, no_update
    keep: object = no_update if action == "alerts-refresh" else []
    return (rule_rows(rules, names), keep, alert_rows(alerts, names), keep, message, *_empty(rules, alerts))
