"""`/`: every run of every project, refreshed every few seconds; tick runs to compare them.

What counts as live is decided by `figures.is_live`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import dash
from dash import Input, Output, callback, dash_table, dcc, html

from mhpo_dashboard.api import ApiError
from mhpo_dashboard.app import api
from mhpo_dashboard.figures import run_rows

dash.register_page(__name__, path="/", title="Runs · MHPO Monitor", name="Runs", order=0)

REFRESH_MS = 5000

COLUMNS = [
    {"id": "project", "name": "project"},
    {"id": "name", "name": "run", "presentation": "markdown"},
    {"id": "status", "name": "status"},
    {"id": "loss", "name": "loss"},
    {"id": "last_step", "name": "last step"},
    {"id": "live", "name": "live (heard from in 2 min)"},
    {"id": "open_flags", "name": "open flags"},
]


def _load() -> tuple[list[dict[str, Any]], str]:
    try:
        return run_rows(api().runs()), ""
    except ApiError as exc:
        return [], str(exc)


def layout(**_: Any) -> Any:
    rows, error = _load()
    return html.Div(
        [
            html.H2("Runs"),
            html.P(error, id="runs-error", className="error"),
            html.Div(
                [
                    dcc.Link("compare selected runs", id="runs-compare-link", href="/compare", className="button"),
                    html.Span(" tick two or more runs", id="runs-compare-hint"),
                ],
                className="toolbar",
            ),
            dash_table.DataTable(
                id="runs-table",
                columns=COLUMNS,
                data=rows,
                row_selectable="multi",
                selected_row_ids=[],
                page_size=50,
                sort_action="native",
                filter_action="native",
                markdown_options={"link_target": "_self"},
                style_cell={"textAlign": "left"},
                style_data_conditional=[
                    {
                        "if": {"filter_query": "{open_flags} > 0", "column_id": "open_flags"},
                        "color": "#d62728",
                        "fontWeight": "bold",
                    },
                    {
                        "if": {"filter_query": '{live} = "yes"', "column_id": "live"},
                        "color": "#2ca02c",
                        "fontWeight": "bold",
                    },
                ],
            ),
            dcc.Interval(id="runs-refresh", interval=REFRESH_MS),
        ]
    )


@callback(
    Output("runs-table", "data"),
    Output("runs-error", "children"),
    Input("runs-refresh", "n_intervals"),
    prevent_initial_call=True,
)
def refresh(_: int) -> tuple[list[dict[str, Any]], str]:
    return _load()


@callback(
    Output("runs-compare-link", "href"),
    Output("runs-compare-hint", "children"),
    Input("runs-table", "selected_row_ids"),
)
def compare_link(selected: list[str] | None) -> tuple[str, str]:
    selected = selected or []
    if len(selected) < 2:
        return "/compare", f" tick two or more runs ({len(selected)} ticked)"
    return "/compare?runs=" + quote(",".join(selected), safe=","), f" {len(selected)} runs ticked"
