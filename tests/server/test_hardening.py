"""Inputs that must never break the service: unstorable text, loose types, secrets, leaky errors.

Every test runs on SQLite and PostgreSQL (the `client` fixture of tests/server/conftest.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.schemas import invalid_key, parse_keys
from mhpo_server.store import open_store
from tests.server.conftest import new_run, post_json

SURROGATE = "\ud800"
RULE = {"name": "r", "project": "p", "condition": {"type": "threshold", "key": "a", "op": ">", "value": 1.0}}


def raw_post(client: TestClient, url: str, body: str) -> Any:
    """POST a JSON text as is, so an escaped lone surrogate ("\\ud800") reaches the server."""
    return client.post(url, content=body.encode(), headers={"content-type": "application/json"})


def error_locs(response: Any) -> list[list[Any]]:
    assert response.status_code == 422, response.text
    return [e["loc"] for e in response.json()["detail"]]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ('{"project":"p","name":"x","config":{"k":"\\ud800"}}', ["body", "config"]),
        ('{"project":"p","name":"x","config":{"\\udc00":1}}', ["body", "config"]),
        ('{"project":"p","name":"x","config":{"a":[{"b":["ok","caf\\udce9"]}]}}', ["body", "config"]),
        ('{"project":"p","name":"x","config":{"k":"nul\\u0000"}}', ["body", "config"]),
        ('{"project":"p\\ud800","name":"x"}', ["body", "project"]),
        ('{"project":"p","name":"\\udfff"}', ["body", "name"]),
        ('{"project":"p","name":"x","loss":"\\ud800"}', ["body", "loss"]),
    ],
)
def test_unstorable_run_text_is_refused_and_nothing_saved(client: TestClient, body: str, loc: list[Any]) -> None:
    response = raw_post(client, "/api/v1/runs", body)
    assert loc in error_locs(response)
    assert response.content.decode("utf-8")  # the error itself is valid UTF-8
    listing = client.get("/api/v1/runs")
    assert listing.status_code == 200 and listing.json()["runs"] == []


def test_config_error_names_the_path(client: TestClient) -> None:
    response = raw_post(
        client, "/api/v1/runs", '{"project":"p","name":"x","config":{"data":{"dirs":["a","caf\\udce9"]}}}'
    )
    message = response.json()["detail"][0]["msg"]
    assert "config['data']['dirs'][1]" in message and "surrogate" in message


def rejected_items(response: Any) -> list[dict[str, Any]]:
    """The items a 200 answer refused one by one (a record's bad item never fails the batch)."""
    assert response.status_code == 200, response.text
    response.content.decode("utf-8")  # the answer is valid UTF-8 even when the key was not
    return response.json()["rejected"]


@pytest.mark.parametrize(
    ("record", "field", "key", "reason"),
    [
        ('{"step":0,"scalars":{"a\\ud800":1.0,"ok":2.0}}', "scalars", "a\ufffd\ufffd\ufffd", "lone surrogate"),
        (
            '{"step":0,"histograms":{"\\udc80":{"lo":0,"hi":1,"counts":[1]}},"scalars":{"ok":2.0}}',
            "histograms",
            "\ufffd\ufffd\ufffd",
            "lone surrogate",
        ),
        ('{"step":0,"scalars":{"a\\u0000":1.0,"ok":2.0}}', "scalars", "a\x00", "pattern"),
        (
            '{"step":0,"outliers":[{"sample":0,"position":0,"x":0,"A":0,"text":"\\ud83d"}],"scalars":{"ok":2.0}}',
            "outliers",
            None,
            "0.text: Value error, contains a lone surrogate",
        ),
        (
            '{"step":0,"outliers":[{"sample":0,"position":0,"x":0,"A":0,"text":"a\\u0000"}],"scalars":{"ok":2.0}}',
            "outliers",
            None,
            "0.text: Value error, contains a NUL character",
        ),
    ],
)
def test_unstorable_record_text_is_refused_alone(
    client: TestClient, record: str, field: str, key: str | None, reason: str
) -> None:
    """Unstorable text in a record's item refuses that item, naming field, key and reason; the rest is stored."""
    run_id = new_run(client)
    response = raw_post(client, f"/api/v1/runs/{run_id}/records", f'{{"batch_id":"b","records":[{record}]}}')
    [item] = rejected_items(response)
    assert (item["step"], item["field"], item["key"]) == (0, field, key)
    assert reason in item["reason"]
    assert response.json()["accepted"] == 1
    assert client.get(f"/api/v1/runs/{run_id}/keys").json() == {"scalars": ["ok"], "histograms": []}
    assert client.get(f"/api/v1/runs/{run_id}/outliers").json()["outliers"] == []


def test_a_valid_key_spelled_like_a_refused_one_is_kept(client: TestClient) -> None:
    """The refused key is named with U+FFFD; a valid key spelled exactly so is stored, not taken for it."""
    run_id = new_run(client)
    record = '{"step":0,"scalars":{"a\\ud800":1.0,"a\\ufffd\\ufffd\\ufffd":2.0}}'
    response = raw_post(client, f"/api/v1/runs/{run_id}/records", f'{{"batch_id":"b","records":[{record}]}}')
    assert [(i["field"], i["key"]) for i in rejected_items(response)] == [("scalars", "a\ufffd\ufffd\ufffd")]
    assert client.get(f"/api/v1/runs/{run_id}/keys").json()["scalars"] == ["a\ufffd\ufffd\ufffd"]
    series = client.get(f"/api/v1/runs/{run_id}/scalars", params={"keys": "a\ufffd\ufffd\ufffd"}).json()["series"]
    assert series["a\ufffd\ufffd\ufffd"]["value"] == [2.0]


def test_unstorable_alert_rule_text_is_refused(client: TestClient) -> None:
    body = json.dumps({**RULE, "name": "x"}).replace('"name": "x"', '"name": "\\ud800"')
    assert ["body", "name"] in error_locs(raw_post(client, "/api/v1/alert-rules", body))
    assert client.get("/api/v1/alert-rules").json()["rules"] == []


def test_key_validation_refuses_surrogates(client: TestClient) -> None:
    """A URL cannot carry a surrogate (invalid UTF-8 percent-escapes decode to U+FFFD); the key rule refuses one anyway."""
    assert invalid_key("a\udcff") is not None and invalid_key("nul\x00") is not None
    assert invalid_key("ratio/p99") is None and invalid_key("x" * 251) is not None
    with pytest.raises(ValueError, match="surrogate"):
        parse_keys("a,\udcff")
    run_id = new_run(client)
    response = client.get(f"/api/v1/runs/{run_id}/scalars?keys=a,%ED%B3%BF")
    assert response.status_code == 200 and response.json()["series"] == {}


def test_a_bad_row_stored_earlier_never_breaks_the_lists(client: TestClient, migrated_url: str) -> None:
    """A row written before the server refused such text (or by another tool) is shown with U+FFFD, not a 500."""
    run_id = new_run(client, project="legacy", name="fine")
    engine = create_engine(migrated_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE runs SET config = :c WHERE run_id = :r"), {"c": '{"path":"/data/caf\\udce9"}', "r": run_id}
            )
    finally:
        engine.dispose()
    for url in ("/api/v1/runs", f"/api/v1/runs/{run_id}", "/api/v1/projects"):
        response = client.get(url)
        assert response.status_code == 200, (url, response.text)
    assert client.get(f"/api/v1/runs/{run_id}").json()["config"] == {"path": "/data/caf\ufffd"}


def test_secrets_in_config_are_redacted(client: TestClient) -> None:
    config = {
        "hf_token": "hf_abc",
        "password": "hunter2",
        "nested": {"apiKey": "k-1", "client_secret": "s"},
        "list": [{"DB_PASSWORD": "pw"}],
        "webhook_url": "https://hooks.slack.com/services/T/B/X",
        "max_new_tokens": 6,
        "tokenizer": "char",
        "token_budget": None,
        "use_auth_token": False,
        "lr": 1e-6,
    }
    run = post_json(client, "/api/v1/runs", {"project": "p", "name": "s", "config": config}).json()
    assert run["config"] == {
        "hf_token": "[redacted]",
        "password": "[redacted]",
        "nested": {"apiKey": "[redacted]", "client_secret": "[redacted]"},
        "list": [{"DB_PASSWORD": "[redacted]"}],
        "webhook_url": "[redacted]",
        "max_new_tokens": 6,
        "tokenizer": "char",
        "token_budget": None,
        "use_auth_token": False,
        "lr": 1e-6,
    }
    assert "hunter2" not in client.get("/api/v1/runs").text


@pytest.mark.parametrize(
    ("record", "loc"),
    [
        ({"step": "1"}, ["body", "records", 0, "step"]),
        ({"step": True}, ["body", "records", 0, "step"]),
        ({"step": 1.5}, ["body", "records", 0, "step"]),
        ({"step": 0, "time": "1"}, ["body", "records", 0, "time"]),
    ],
)
def test_loose_record_types_are_refused(client: TestClient, record: dict[str, Any], loc: list[Any]) -> None:
    """A loose type of the record itself (step, time) refuses the whole batch."""
    run_id = new_run(client)
    body = {"batch_id": "b", "records": [{**record, "scalars": {"ok": 1.0}}]}
    assert loc in error_locs(post_json(client, f"/api/v1/runs/{run_id}/records", body))
    assert client.get(f"/api/v1/runs/{run_id}/keys").json() == {"scalars": [], "histograms": []}


@pytest.mark.parametrize(
    ("items", "field", "key", "reason"),
    [
        ({"scalars": {"a": True}}, "scalars", "a", "Input should be a valid number"),
        ({"scalars": {"a": "1.5"}}, "scalars", "a", "Input should be a valid number"),
        (
            {"histograms": {"h": {"lo": 0, "hi": 1, "counts": [True]}}},
            "histograms",
            "h",
            "counts.0: Input should be a valid integer",
        ),
        (
            {"outliers": [{"sample": "0", "position": 0, "x": 0, "A": 0}]},
            "outliers",
            None,
            "0.sample: Input should be a valid integer",
        ),
    ],
)
def test_loose_item_types_are_refused_alone(
    client: TestClient, items: dict[str, Any], field: str, key: str | None, reason: str
) -> None:
    """A loose type inside an item (a scalar given as true) refuses that item, naming field, key and reason."""
    run_id = new_run(client)
    record = {"step": 0, **items, "scalars": {**items.get("scalars", {}), "ok": 1.0}}
    response = post_json(client, f"/api/v1/runs/{run_id}/records", {"batch_id": "b", "records": [record]})
    assert rejected_items(response) == [{"step": 0, "field": field, "key": key, "reason": reason}]
    assert response.json()["accepted"] == 1
    assert client.get(f"/api/v1/runs/{run_id}/keys").json() == {"scalars": ["ok"], "histograms": []}
    assert client.get(f"/api/v1/runs/{run_id}/outliers").json()["outliers"] == []


def test_ints_are_still_floats(client: TestClient) -> None:
    run_id = new_run(client)
    body = {"batch_id": "b", "records": [{"step": 0, "time": 1, "scalars": {"a": 1}}]}
    assert post_json(client, f"/api/v1/runs/{run_id}/records", body).json() == {
        "accepted": 1,
        "duplicates": 0,
        "rejected": [],
    }


def test_integral_floats_are_steps_of_rewind_and_fork(client: TestClient) -> None:
    run_id = new_run(client)
    stored = post_json(
        client, f"/api/v1/runs/{run_id}/records", {"batch_id": "b0", "records": [{"step": 0, "scalars": {"x": 1.0}}]}
    )
    assert stored.status_code == 200, stored.text  # a fork needs a logged step to start from
    assert client.post(f"/api/v1/runs/{run_id}/rewind", json={"step": 0.0}).status_code == 200
    assert client.post(f"/api/v1/runs/{run_id}/fork", json={"step": 0.0}).status_code == 201
    assert ["body", "step"] in error_locs(client.post(f"/api/v1/runs/{run_id}/rewind", json={"step": 0.5}))
    assert ["body", "step"] in error_locs(client.post(f"/api/v1/runs/{run_id}/rewind", json={"step": True}))


def test_run_id_conflict_names_nothing_of_the_other_run(client: TestClient) -> None:
    run_id = new_run(client, project="team-a", name="secret-experiment")
    response = post_json(client, "/api/v1/runs", {"project": "team-b", "name": "mine", "run_id": run_id})
    assert response.status_code == 409
    assert "team-a" not in response.text and "secret-experiment" not in response.text


def test_patch_enabled_null_leaves_the_rule_unchanged(client: TestClient) -> None:
    rule = post_json(client, "/api/v1/alert-rules", RULE).json()
    response = client.patch(f"/api/v1/alert-rules/{rule['id']}", json={"enabled": None, "name": None})
    assert response.status_code == 200, response.text
    assert (response.json()["enabled"], response.json()["name"]) == (True, "r")


def test_read_tokens_see_webhook_urls_masked(migrated_url: str) -> None:
    store = open_store(migrated_url)
    try:
        write, read = store.create_token("p", "write"), store.create_token("p", "read")
    finally:
        store.close()
    url = "https://hooks.slack.com/services/T000/B000/XXXXSECRET"
    with TestClient(create_app(Settings(db=migrated_url, auth=True, dashboard=False))) as client:
        created = post_json(
            client,
            "/api/v1/alert-rules",
            {**RULE, "channels": ["webhook"], "webhook_url": url},
            headers={"Authorization": f"Bearer {write}"},
        ).json()
        as_write = client.get(f"/api/v1/alert-rules/{created['id']}", headers={"Authorization": f"Bearer {write}"})
        as_read = client.get(f"/api/v1/alert-rules/{created['id']}", headers={"Authorization": f"Bearer {read}"})
        listed = client.get("/api/v1/alert-rules", headers={"Authorization": f"Bearer {read}"})
    assert as_write.json()["webhook_url"] == url
    assert as_read.json()["webhook_url"] == "https://hooks.slack.com/***"
    assert listed.json()["rules"][0]["webhook_url"] == "https://hooks.slack.com/***"
    assert "SECRET" not in as_read.text + listed.text


def test_openapi_states_the_enforced_max_points(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    params = {
        p["name"]: p["schema"] for op in schema["paths"].values() for o in op.values() for p in o.get("parameters", [])
    }
    assert params["max_points"]["maximum"] == params["max_steps"]["maximum"] == Settings(db="sqlite://").max_points
    run_id = new_run(client)
    at_max = client.get(f"/api/v1/runs/{run_id}/scalars", params={"max_points": params["max_points"]["maximum"]})
    beyond = client.get(f"/api/v1/runs/{run_id}/scalars", params={"max_points": params["max_points"]["maximum"] + 1})
    assert (at_max.status_code, beyond.status_code) == (200, 422)
