"""The dashboard's login on a real `mhpo serve` with auth on: no session, no data.

One server for the module (auth on, two projects, a read and a write token each), seeded
over HTTP. Raw httpx requests check what a viewer without a session gets from every Dash
route, that a viewer of project alpha cannot read project beta through the callbacks, the
origin check, and revocation; a headless Chromium logs in, reads a run page and logs out.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from mhpo_server.store import open_store
from tests.dashboard.browsing import PLOT, open_page
from tests.dashboard.callbacks import route
from tests.dashboard.seeding import create_run, post_records, records
from tests.fixtures.server import LiveServer

STEPS = 30


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str], dict[str, str]]]:
    """(server, tokens by "alpha-read"/"alpha-write"/"beta-read"/"beta-write", run ids by project)."""
    db = f"sqlite:///{tmp_path_factory.mktemp('login') / 'mhpo.db'}"
    server = LiveServer(db, env={"MHPO_AUTH": "true", "MHPO_DASHBOARD_SECRET": secrets.token_urlsafe(32)})
    server.migrate()
    store = open_store(db)
    tokens = {f"{p}-{s}": store.create_token(p, s) for p in ("alpha", "beta") for s in ("read", "write")}
    store.close()
    with server:
        run_ids = {}
        for project in ("alpha", "beta"):
            with httpx.Client(
                base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {tokens[project + '-write']}"}
            ) as client:
                run_ids[project] = create_run(client, project, f"{project}-run", "mhpo", {"lr": 1e-6})
                post_records(client, run_ids[project], list(records(0, STEPS, seed=4, spike_at=20)))
        yield server, tokens, run_ids


@contextmanager
def _login(server: LiveServer, token: str) -> Iterator[httpx.Client]:
    """A raw client holding a dashboard session for `token` (as the form would post it)."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        answer = client.post("/login", data={"token": token, "next": "/"}, headers={"Origin": server.url})
        assert answer.status_code == 303, answer.text
        yield client


def _refresh_runs(client: httpx.Client) -> httpx.Response:
    """The runs page's periodic refresh callback (a plain Dash POST, as the browser sends it)."""
    body = {
        "output": "..runs-table.data...runs-error.children..",
        "outputs": [{"id": "runs-table", "property": "data"}, {"id": "runs-error", "property": "children"}],
        "inputs": [{"id": "runs-refresh", "property": "n_intervals", "value": 1}],
        "changedPropIds": ["runs-refresh.n_intervals"],
        "state": [],
    }
    return client.post("/_dash-update-component", json=body)


def test_without_a_session_pages_redirect_to_the_form_and_dash_routes_answer_401(secured: Any) -> None:
    server, _tokens, run_ids = secured
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for path in ("/", f"/runs/{run_ids['alpha']}", "/compare?runs=a,b", "/alerts"):
            answer = anonymous.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login?next="), path
        assert anonymous.get("/login?next=/alerts").status_code == 200
        for method, path in (
            ("GET", "/_dash-layout"),
            ("GET", "/_dash-dependencies"),
            ("POST", "/_dash-update-component"),
        ):
            answer = anonymous.request(method, path, json={} if method == "POST" else None)
            assert answer.status_code == 401 and "log in" in answer.json()["detail"], (path, answer.text)
        assert _refresh_runs(anonymous).status_code == 401
        assert anonymous.get("/assets/style.css").status_code == 200  # static files hold no data
    with httpx.Client(base_url=server.url, timeout=30, cookies={"mhpo_session": "gAAAAAforged"}) as forger:
        forged = forger.post("/_dash-update-component", json={})
        assert forged.status_code == 401 and "log in" in forged.json()["detail"]


def test_login_refuses_unknown_tokens_and_other_sites(secured: Any) -> None:
    server, tokens, _ = secured
    with httpx.Client(base_url=server.url, timeout=30) as client:
        wrong = client.post("/login", data={"token": "mhpo_not-a-token"}, headers={"Origin": server.url})
        assert wrong.status_code == 200 and "does not know this token" in wrong.text
        assert "mhpo_not-a-token" not in wrong.text and not client.cookies
        cross_site = client.post(
            "/login", data={"token": tokens["alpha-read"]}, headers={"Origin": "http://evil.example"}
        )
        assert cross_site.status_code == 403 and not client.cookies
        for elsewhere in ("//evil.example/x", "/\\evil.example", "/\t/evil.example", "http://evil.example/"):
            away = client.post(
                "/login", data={"token": tokens["alpha-read"], "next": elsewhere}, headers={"Origin": server.url}
            )
            assert away.status_code == 303 and away.headers["location"] == "/", elsewhere
    with _login(server, tokens["alpha-read"]) as viewer:
        refused = viewer.post("/_dash-update-component", json={}, headers={"Origin": "http://evil.example"})
        assert refused.status_code == 403
        assert tokens["alpha-read"] not in viewer.cookies["mhpo_session"]


def test_a_viewer_of_one_project_cannot_read_another_through_the_callbacks(secured: Any) -> None:
    server, tokens, run_ids = secured
    with _login(server, tokens["alpha-read"]) as alpha:
        runs = _refresh_runs(alpha)
        assert runs.status_code == 200
        assert "alpha-run" in runs.text and "beta-run" not in runs.text and "beta" not in runs.text
        own = route(alpha, f"/runs/{run_ids['alpha']}")
        assert own.status_code == 200 and "alpha-run" in own.text and "tok" in own.text
        other = route(alpha, f"/runs/{run_ids['beta']}")
        assert other.status_code == 200 and "Run not available" in other.text
        assert "beta-run" not in other.text and "tok1" not in other.text
        alerts = route(alpha, "/alerts")
        assert alerts.status_code == 200 and "beta" not in alerts.text
    with _login(server, tokens["beta-read"]) as beta:
        assert "beta-run" in _refresh_runs(beta).text and "alpha-run" not in _refresh_runs(beta).text


def test_a_revoked_token_stops_working_on_the_next_request(secured: Any) -> None:
    server, _tokens, _ = secured
    store = open_store(server.db_url)
    token = store.create_token("alpha", "read")
    with _login(server, token) as viewer:
        assert _refresh_runs(viewer).status_code == 200
        assert store.revoke_token(token)
        store.close()
        assert _refresh_runs(viewer).status_code == 401
        page_answer = viewer.get("/")
        assert page_answer.status_code == 303 and page_answer.headers["location"].startswith("/login")


@pytest.mark.browser
def test_browser_is_sent_to_the_form_logs_in_reads_a_run_and_logs_out(secured: Any, page: Any) -> None:
    server, tokens, run_ids = secured
    run_url = f"{server.url}/runs/{run_ids['alpha']}"
    page.goto(run_url)
    page.wait_for_selector("#login-token")
    assert page.url.startswith(f"{server.url}/login?next=")
    page.fill("#login-token", "mhpo_wrong")
    page.click("#login-submit")
    page.wait_for_selector("#login-message")
    assert "does not know this token" in page.inner_text("#login-message")
    page.fill("#login-token", tokens["alpha-read"])
    page.click("#login-submit")
    page.wait_for_selector(f".graph-heatmap {PLOT}", timeout=30_000)
    page.wait_for_load_state("networkidle")
    assert page.url == run_url
    assert "alpha-run" in page.inner_text("#run-summary") and "tok" in page.inner_text("#run-outliers")
    assert "alpha · read" in page.inner_text("#nav-viewer")
    cookie = next(c for c in page.context.cookies() if c["name"] == "mhpo_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]
    assert tokens["alpha-read"] not in cookie["value"]
    assert page.evaluate("() => document.cookie") == ""  # not readable by scripts
    open_page(page, server.url + "/", "#runs-table")
    assert "alpha-run" in page.inner_text("#runs-table") and "beta-run" not in page.inner_text("#runs-table")
    page.click("#nav-logout")
    page.wait_for_selector("#login-token")
    assert not [c for c in page.context.cookies() if c["name"] == "mhpo_session"]
    page.goto(run_url)
    page.wait_for_selector("#login-token")
    assert page.url.startswith(f"{server.url}/login?next=")
    assert tokens["alpha-read"] not in server.log() and "mhpo_wrong" not in server.log()


def test_a_public_dashboard_shows_its_read_tokens_project_without_a_login(secured: Any) -> None:
    """MHPO_DASHBOARD_PUBLIC_TOKEN: no login needed, only that project, read-only; logging in still works."""
    server, tokens, run_ids = secured
    store = open_store(server.db_url)
    public_token = store.create_token("alpha", "read")
    store.close()
    env = {
        "MHPO_AUTH": "true",
        "MHPO_DASHBOARD_SECRET": secrets.token_urlsafe(32),
        "MHPO_DASHBOARD_PUBLIC_TOKEN": public_token,
        "MHPO_DASHBOARD_COOKIE_SECURE": "true",
    }
    with LiveServer(server.db_url, env=env) as public, httpx.Client(base_url=public.url, timeout=60) as anonymous:
        assert anonymous.get("/").status_code == 200
        runs = _refresh_runs(anonymous)
        assert runs.status_code == 200 and "alpha-run" in runs.text and "beta-run" not in runs.text
        assert "Run not available" in route(anonymous, f"/runs/{run_ids['beta']}").text
        layout = json.dumps(anonymous.get("/_dash-layout").json(), ensure_ascii=False)
        assert "public · alpha · read" in layout and "nav-login" in layout
        login = anonymous.post("/login", data={"token": tokens["beta-read"]}, headers={"Origin": public.url})
        set_cookie = login.headers["set-cookie"].lower()
        assert login.status_code == 303 and "; secure" in set_cookie and "; httponly" in set_cookie
        assert "samesite=lax" in set_cookie
        assert "beta-run" not in _refresh_runs(anonymous).text, "a Secure cookie never travels over plain http"
        session = {"Cookie": f"mhpo_session={login.cookies['mhpo_session']}"}  # as a browser on https sends it
        with httpx.Client(base_url=public.url, timeout=60, headers=session) as beta:
            assert "beta-run" in _refresh_runs(beta).text


@pytest.mark.browser
def test_an_open_page_goes_to_the_form_once_its_token_is_revoked(secured: Any, browser: Any) -> None:
    server, _tokens, run_ids = secured
    store = open_store(server.db_url)
    token = store.create_token("alpha", "read")
    context = browser.new_context()
    tab = context.new_page()
    problems: list[str] = []
    tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    try:
        tab.goto(f"{server.url}/login?next=/runs/{run_ids['alpha']}")
        tab.fill("#login-token", token)
        tab.click("#login-submit")
        tab.wait_for_selector(f".graph-heatmap {PLOT}", timeout=30_000)
        assert store.revoke_token(token)
        tab.wait_for_selector("#login-token", timeout=30_000)  # the run page polls every second
        assert tab.url.startswith(f"{server.url}/login?next=")
    finally:
        context.close()
        store.close()
    assert all("status of 401" in p for p in problems), problems  # only the refused requests
