"""The Dash application: four pages (`/`, `/runs/<run_id>`, `/compare`, `/alerts`) over the query API.

`create_dash` builds a Flask-backed Dash app; `mhpo serve` mounts its WSGI server at "/"
beside the FastAPI routes (same process, same port), and the dashboard reads the data
through that same server's HTTP API (`api_base_url`), never the database, so the very same
app also runs against a remote server.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dash
import flask
from a2wsgi import WSGIMiddleware
from dash import Input, Output, dcc, html
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Scope

from mhpo_dashboard.api import ApiClient, ApiError
from mhpo_dashboard.auth import Sessions, install_login, viewer

logger = logging.getLogger(__name__)

PAGES_DIR = Path(__file__).resolve().parent / "pages"
API_CONFIG_KEY = "MHPO_API"
LIVE_CONFIG_KEY = "MHPO_LIVE_INTERVAL_MS"
LIVE_INTERVAL_MS = 1000
MAX_COMPARE_CONFIG_KEY = "MHPO_MAX_COMPARE_RUNS"
MAX_COMPARE_RUNS = 20
CALLBACK_ERROR_ID = "callback-error"
# A new page clears the last callback's error; run in the browser, so before any answer of the server.
CLEAR_ERROR_ON_NAVIGATION = "function (pathname) { return ''; }"
# plotly.js's cartesian bundle (package plotly.js-cartesian-dist-min, the same plotly.js version
# as the plotly package's full bundle): scatter, bar, heatmap and the other 2-D trace types,
# all that the charts draw (a trace type outside it would not draw). A third of the full
# bundle's size (1.5 MB, not 4.8 MB), it evaluates in about half the time.
PLOTLY_BUNDLE = "plotly-cartesian-4.1.1.min.js"
# Renderer hook: dcc.Graph loads plotly.js from `window._dashPlotlyJSURL` (unless `window.Plotly`
# exists) only once a page's figures have arrived. Pointing that URL at the cartesian bundle
# and starting to load it, with dcc's graph chunk, at a chart page's first callback lets the
# browser evaluate plotly.js while the server builds the page instead of after it.
EARLY_GRAPH_SCRIPTS_HOOK = """function () {
  window._dashPlotlyJSURL = "{prefix}assets/{bundle}";
  if (window.Plotly || window._mhpoGraphScripts || !/\\/(runs\\/|compare)/.test(location.pathname)) { return; }
  window._mhpoGraphScripts = true;
  var settle = {};
  // A graph that mounts before the bundle has run would fetch a second copy (dcc.Graph loads it unless
  // window.Plotly is set): until the bundle defines the real window.Plotly, a promise of it makes dcc wait.
  window.Plotly = new Promise(function (resolve, reject) { settle = {resolve: resolve, reject: reject}; });
  [window._dashPlotlyJSURL, "{prefix}_dash-component-suites/dash/dcc/async-graph.js"].forEach(function (src, i) {
    var script = document.createElement("script");
    script.src = src;
    script.async = true;
    if (i === 0) { script.onload = settle.resolve; script.onerror = settle.reject; }
    document.head.appendChild(script);
  });
}"""

__all__ = [
    "API_CONFIG_KEY",
    "LIVE_INTERVAL_MS",
    "MAX_COMPARE_RUNS",
    "DashboardMount",
    "Login",
    "api",
    "create_dash",
    "max_compare_runs",
    "mount_dashboard",
    "refresh_interval_ms",
    "self_url",
]


@dataclass(frozen=True)
class Login:
    """Viewers log in with their own API token (see `mhpo_dashboard.auth`); for servers with auth on."""

    secret: bytes
    """key of the session cookie (keep it stable: changing it logs every viewer out)"""
    max_age_s: float = 12 * 3600
    """how long a login lasts"""
    cookie_secure: bool | None = None
    """mark the cookie Secure; None: when the request came over https"""


def api() -> ApiClient:
    """The API client for the current request: with a login, it sends that viewer's token."""
    client: ApiClient = flask.current_app.config[API_CONFIG_KEY]
    who = viewer()
    return client if who is None else client.as_viewer(who.token)


def refresh_interval_ms() -> int:
    return int(flask.current_app.config.get(LIVE_CONFIG_KEY, LIVE_INTERVAL_MS))


def max_compare_runs() -> int:
    """How many runs one comparison may show (`MHPO_DASHBOARD_MAX_COMPARE_RUNS` under `mhpo serve`)."""
    return int(flask.current_app.config.get(MAX_COMPARE_CONFIG_KEY, MAX_COMPARE_RUNS))


def show_callback_error(error: Exception) -> None:
    """Any callback that raises: its outputs stay as they were and the page says what failed (never a 500).

    An API error's message is the server's answer (status and detail); anything else is logged
    here with its traceback and shown only as a short notice, since its text may hold internals.
    """
    if isinstance(error, ApiError):
        message = f"could not load this view: {error}"
    else:
        logger.error("dashboard callback failed", exc_info=error)
        message = "could not update this view (an internal error; the server log has the details)"
    dash.set_props(CALLBACK_ERROR_ID, {"children": message})


def _nav(prefix: str) -> html.Nav:
    """The menu, and with a login who is viewing and a log-out (or log-in) link."""
    links: list[Any] = [
        dcc.Link("MHPO Monitor", href="/", className="brand"),
        dcc.Link("Runs", href="/"),
        dcc.Link("Compare", href="/compare"),
        dcc.Link("Alerts", href="/alerts"),
    ]
    who = viewer()
    if who is not None:
        label = f"public · {who.project} · read" if who.public else f"{who.project or 'all projects'} · {who.scope}"
        links += [
            html.Span(label, id="nav-viewer", className="viewer"),
            html.A("log in", href=f"{prefix}login", id="nav-login")
            if who.public
            else html.A("log out", href=f"{prefix}logout", id="nav-logout"),
        ]
    return html.Nav(links, className="nav")


def create_dash(
    api_base_url: str,
    token: str | None = None,
    requests_pathname_prefix: str = "/",
    live_interval_ms: int = LIVE_INTERVAL_MS,
    login: Login | None = None,
    max_compare_runs: int = MAX_COMPARE_RUNS,
) -> dash.Dash:
    """A Dash app reading the API at `api_base_url`.

    Without `login`, every viewer acts with `token` (None: a server with auth off). With
    `login`, each viewer logs in with their own token, and `token`, if given, is a public
    read token for viewers who have not. `live_interval_ms` is how often an open run page
    asks for new records; `max_compare_runs` how many runs one comparison may show.
    """
    app = dash.Dash(
        "mhpo_dashboard",
        use_pages=True,
        pages_folder=str(PAGES_DIR),
        title="MHPO Monitor",
        requests_pathname_prefix=requests_pathname_prefix,
        suppress_callback_exceptions=True,
        update_title="",  # the tab title stays as it is while callbacks run
        on_error=show_callback_error,
        assets_folder=str(Path(__file__).resolve().parent / "assets"),
        assets_ignore=re.escape(PLOTLY_BUNDLE),  # served, but loaded only by the hook below
        hooks={
            "request_pre": EARLY_GRAPH_SCRIPTS_HOOK.replace("{prefix}", requests_pathname_prefix).replace(
                "{bundle}", PLOTLY_BUNDLE
            )
        },
    )
    client = ApiClient(api_base_url, token=None if login else token)
    app.server.config[API_CONFIG_KEY] = client
    app.server.config[LIVE_CONFIG_KEY] = live_interval_ms
    app.server.config[MAX_COMPARE_CONFIG_KEY] = max_compare_runs
    app.layout = lambda: html.Div(
        [
            _nav(requests_pathname_prefix),
            html.Main(
                [html.Div(id=CALLBACK_ERROR_ID, className="error", role="alert"), dash.page_container],
                className="page",
            ),
        ]
    )
    app.clientside_callback(
        CLEAR_ERROR_ON_NAVIGATION, Output(CALLBACK_ERROR_ID, "children"), Input("_pages_location", "pathname")
    )
    # Dash hands the `@callback`s collected while importing the pages to the first app that
    # serves a request; running that hook now binds them to this app, so several apps in one
    # process (one per `create_app` in tests) each get their own complete set.
    with app.server.test_request_context("/"):
        app.server.preprocess_request()
    if login is not None:  # after that hook, which the login's guard would otherwise stop
        install_login(
            app.server,
            client,
            Sessions(login.secret, login.max_age_s),
            requests_pathname_prefix,
            app.config.routes_pathname_prefix,
            public_token=token,
            cookie_secure=login.cookie_secure,
        )
    return app


class DashboardMount(Mount):
    """A mount at "/" that yields to every other route of the app and never answers under /api/.

    So API paths keep their own 404 and 405 answers (a plain `Mount("/")` would swallow
    them), whatever routers are added to the app before or after the dashboard.
    """

    def __init__(self, app: Any, routes: list[BaseRoute]) -> None:
        super().__init__("/", app=app)
        self._siblings = routes

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["path"].startswith("/api/"):
            return Match.NONE, {}
        for route in self._siblings:
            if route is not self and route.matches(scope)[0] != Match.NONE:
                return Match.NONE, {}
        return super().matches(scope)


def self_url(host: str, port: int) -> str:
    """The URL at which a server bound to host:port reaches itself (wildcard binds -> loopback)."""
    if host in {"0.0.0.0", ""}:
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def mount_dashboard(
    fastapi_app: Any,
    api_base_url: str,
    token: str | None = None,
    login: Login | None = None,
    max_compare_runs: int = MAX_COMPARE_RUNS,
) -> dash.Dash:
    """Serve the dashboard from `fastapi_app` (same process and port), reading the API at `api_base_url`.

    `token`, `login` and `max_compare_runs` as in `create_dash`.
    """
    app = create_dash(api_base_url, token=token, login=login, max_compare_runs=max_compare_runs)
    routes = fastapi_app.router.routes
    routes.append(DashboardMount(WSGIMiddleware(app.server), routes))
    return app
