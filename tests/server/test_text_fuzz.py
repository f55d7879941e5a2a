"""Fuzz every text field of the write API against a real server, on SQLite and PostgreSQL.

Text is drawn with lone surrogates, NUL and other control characters, emoji and line
separators mixed in. Whatever the value, the server either stores it and returns it
unchanged, or refuses it with a 4xx naming the field and stores nothing; a record's item
(key, outlier text) is refused alone instead: 200 with the item listed in `rejected`,
naming its field, key and reason, and not stored. Never a 5xx, and every list (runs,
projects, alert rules, alerts) keeps answering valid UTF-8 JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.server import REPO_ROOT, LiveServer

MAX_EXAMPLES = 12  # per field
LISTS = ("/api/v1/runs", "/api/v1/projects", "/api/v1/alert-rules", "/api/v1/alerts")
RULE = {"name": "r", "project": "p", "condition": {"type": "threshold", "key": "a", "op": ">", "value": 1.0}}

hostile = st.lists(
    st.one_of(
        st.characters(),
        st.characters(categories=["Cs"]),  # lone surrogates
        st.sampled_from(["\x00", "\x1f", "\x7f", "\u2028", "\ufeff", "\U0001f600", "é", "/", "%", "\\"]),
    ),
    min_size=0,
    max_size=12,
).map("".join)
text_values = st.one_of(hostile, st.text(max_size=12))

Target = Callable[[str, str], tuple[str, str, dict[str, Any], Callable[[httpx.Response], Any], Any]]


def run_field(field: str) -> Target:
    def build(_run_id: str, value: str) -> tuple[str, str, dict[str, Any], Callable[[httpx.Response], Any], Any]:
        body: dict[str, Any] = {"project": "p", "name": "n", field: value}
        return "POST", "/api/v1/runs", body, lambda r: r.json()[field], value

    return build


def config(path: Callable[[str], dict[str, Any]]) -> Target:
    def build(_run_id: str, value: str) -> tuple[str, str, dict[str, Any], Callable[[httpx.Response], Any], Any]:
        cfg = path(value)
        return "POST", "/api/v1/runs", {"project": "p", "name": "n", "config": cfg}, lambda r: r.json()["config"], cfg

    return build


def record(make: Callable[[str], dict[str, Any]], read: Callable[[httpx.Response], Any], path: str) -> Target:
    def build(run_id: str, value: str) -> tuple[str, str, dict[str, Any], Callable[[httpx.Response], Any], Any]:
        body = {"batch_id": uuid.uuid4().hex, "records": [{"step": 0, **make(value)}]}
        return "POST", f"/api/v1/runs/{run_id}/records", body, read, (run_id, path, value)

    return build


def rule_field(update: Callable[[str], dict[str, Any]], read: Callable[[dict[str, Any]], Any]) -> Target:
    def build(_run_id: str, value: str) -> tuple[str, str, dict[str, Any], Callable[[httpx.Response], Any], Any]:
        body = {**RULE, **update(value)}
        return "POST", "/api/v1/alert-rules", body, lambda r: read(r.json()), value

    return build


TARGETS: dict[str, Target] = {
    "project": run_field("project"),
    "name": run_field("name"),
    "loss": run_field("loss"),
    "config value": config(lambda v: {"k": v}),
    "config key": config(lambda v: {v: 1}),
    "nested config": config(lambda v: {"a": [{"b": v}], "c": {v: [v]}}),
    "scalar key": record(lambda v: {"scalars": {v: 1.0}}, lambda r: r, "scalars"),
    "histogram key": record(
        lambda v: {"histograms": {v: {"lo": 0.0, "hi": 1.0, "counts": [1]}}}, lambda r: r, "histograms"
    ),
    "outlier text": record(
        lambda v: {"outliers": [{"sample": 0, "position": 0, "x": 0.0, "A": 0.0, "text": v}]}, lambda r: r, "outliers"
    ),
    "rule name": rule_field(lambda v: {"name": v}, lambda j: j["name"]),
    "rule project": rule_field(lambda v: {"project": v}, lambda j: j["project"]),
    "rule key": rule_field(lambda v: {"condition": {**RULE["condition"], "key": v}}, lambda j: j["condition"]["key"]),
}


FIELD = {
    "project": "project",
    "name": "name",
    "loss": "loss",
    "config value": "config",
    "config key": "config",
    "nested config": "config",
    "scalar key": "scalars",
    "histogram key": "histograms",
    "outlier text": "outliers",
    "rule name": "name",
    "rule project": "project",
    "rule key": "condition",
}


def post(client: httpx.Client, method: str, url: str, body: Any) -> httpx.Response:
    # json.dumps escapes a lone surrogate as "\ud800", exactly what a client library would send.
    return client.request(method, url, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def check_lists(client: httpx.Client) -> None:
    for url in LISTS:
        response = client.get(url)
        assert response.status_code == 200, (url, response.text)
        response.content.decode("utf-8")


def check_record_stored(client: httpx.Client, expected: tuple[str, str, str], accepted: bool) -> None:
    run_id, path, value = expected
    if path == "outliers":
        outliers = client.get(f"/api/v1/runs/{run_id}/outliers", params={"step": 0}).json()["outliers"]
        assert (value in [o["text"] for o in outliers]) == accepted
        return
    keys = client.get(f"/api/v1/runs/{run_id}/keys").json()[path]
    assert (value in keys) == accepted


def check_refused_item(refused: list[dict[str, Any]], target: str, value: str) -> None:
    """The one item of the record, refused alone: its field, its key (lone surrogates as U+FFFD), a reason."""
    [item] = refused
    key = None if target == "outlier text" else value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    assert (item["step"], item["field"], item["key"]) == (0, FIELD[target], key), item
    assert item["reason"], item


def test_every_text_field(live_server_db: LiveServer) -> None:
    with httpx.Client(base_url=live_server_db.url, timeout=30) as client:
        for target in TARGETS:
            fuzz_field(client, target)


def fuzz_field(client: httpx.Client, target: str) -> None:
    @given(value=text_values)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(value: str) -> None:
        run_id = post(client, "POST", "/api/v1/runs", {"project": "p", "name": "host"}).json()["run_id"]
        method, url, body, read, expected = TARGETS[target](run_id, value)
        response = post(client, method, url, body)
        assert response.status_code < 500, (target, ascii(value), response.status_code, response.text)
        response.content.decode("utf-8")
        if response.status_code >= 400:
            assert response.status_code == 422, (target, ascii(value), response.text)
            detail = response.json()["detail"]
            assert any(loc["loc"][:1] == ["body"] and FIELD[target] in loc["loc"] for loc in detail), detail
        if isinstance(expected, tuple):
            refused = response.json()["rejected"] if response.status_code == 200 else []
            if refused:
                check_refused_item(refused, target, value)
            check_record_stored(client, expected, response.status_code == 200 and not refused)
        elif response.status_code < 300:
            assert read(response) == expected  # stored and returned unchanged
        check_lists(client)

    fuzz()


def test_token_command_refuses_unstorable_project_names(sqlite_url: str) -> None:
    """`mhpo token create --project` with a non-UTF-8 argument (a lone surrogate after decoding) is refused."""
    import mhpo_migrations

    mhpo_migrations.upgrade(sqlite_url)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mhpo",
            "token",
            "create",
            "--project",
            b"caf\xe9",
            "--scope",
            "read",
            "--db",
            sqlite_url,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert b"--project" in proc.stderr and not proc.stdout
