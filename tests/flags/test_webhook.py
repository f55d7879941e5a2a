"""Webhook delivery from a real `mhpo serve` process to a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.server import LiveServer

WEBHOOK_ENV = {
    "MHPO_WEBHOOK_BACKOFF_S": "0.05",
    "MHPO_WEBHOOK_MAX_ATTEMPTS": "3",
    "MHPO_WEBHOOK_TIMEOUT_S": "30",
    "MHPO_WEBHOOK_ALLOW_CIDRS": "127.0.0.1/32",  # the receiver is on loopback, refused by default
}


class Receiver:
    """A loopback HTTP server that records POSTs and answers with the scripted status codes."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self.waiting = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.waiting.set()
                receiver.release.wait(30)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.bodies.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = Path(tmp_path_factory.mktemp("webhook")) / "mhpo.db"
    with LiveServer(f"sqlite:///{db}", env=WEBHOOK_ENV) as live:
        yield live


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def setup_run(server: LiveServer, receiver: Receiver) -> tuple[str, dict[str, Any]]:
    run_id = httpx.post(f"{server.url}/api/v1/runs", json={"project": "hooks", "name": "r"}).json()["run_id"]
    rule = httpx.post(
        f"{server.url}/api/v1/alert-rules",
        json={
            "name": "loss high",
            "project": "hooks",
            "run_id": run_id,
            "cooldown_s": 0,
            "severity": "critical",
            "condition": {"type": "threshold", "key": "loss", "op": ">", "value": 1.0},
            "channels": ["dashboard", "webhook"],
            "webhook_url": receiver.url,
        },
    )
    assert rule.status_code == 201, rule.text
    return run_id, rule.json()


def post_loss(server: LiveServer, run_id: str, values: list[float], start: int = 0) -> httpx.Response:
    records = [{"step": start + i, "time": 1.7e9 + start + i, "scalars": {"loss": v}} for i, v in enumerate(values)]
    body = {"batch_id": uuid.uuid4().hex, "records": records}
    r = httpx.post(f"{server.url}/api/v1/runs/{run_id}/records", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alerts_of(server: LiveServer, run_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{server.url}/api/v1/alerts", params={"run_id": run_id}).json()["alerts"]


def settled(server: LiveServer, run_id: str) -> list[dict[str, Any]] | None:
    found = alerts_of(server, run_id)
    return found if found and all(a["delivery_status"] in {"delivered", "failed"} for a in found) else None


def test_webhook_is_delivered_with_a_slack_compatible_body(server: LiveServer, receiver: Receiver) -> None:
    run_id, rule = setup_run(server, receiver)
    post_loss(server, run_id, [0.5, 0.5, 2.5])
    (alert,) = wait_for("delivery", lambda: settled(server, run_id))
    assert alert["delivery_status"] == "delivered" and alert["delivery_attempts"] == 1
    assert alert["delivered_at"] is not None and alert["delivery_error"] is None
    (body,) = receiver.bodies
    assert isinstance(body["text"], str) and "loss high" in body["text"] and "critical" in body["text"]
    assert body["alert"]["id"] == alert["id"] and body["alert"]["rule_id"] == rule["id"]
    assert body["alert"]["run_id"] == run_id and body["alert"]["step"] == 2
    assert body["alert"]["evidence"]["value"] == 2.5


def test_failed_webhook_is_retried_with_back_off(server: LiveServer, receiver: Receiver) -> None:
    run_id, _ = setup_run(server, receiver)
    receiver.statuses = [500, 503]
    post_loss(server, run_id, [0.5, 2.0])
    (alert,) = wait_for("delivery", lambda: settled(server, run_id))
    assert alert["delivery_status"] == "delivered" and alert["delivery_attempts"] == 3
    assert len(receiver.bodies) == 3 and len({b["alert"]["id"] for b in receiver.bodies}) == 1


def test_webhook_gives_up_after_max_attempts_and_stores_the_error(server: LiveServer, receiver: Receiver) -> None:
    run_id, _ = setup_run(server, receiver)
    receiver.statuses = [500] * 10
    post_loss(server, run_id, [0.5, 2.0])
    (alert,) = wait_for("delivery", lambda: settled(server, run_id))
    assert alert["delivery_status"] == "failed" and alert["delivery_attempts"] == 3
    assert "500" in alert["delivery_error"]
    assert len(receiver.bodies) == 3


def test_unreachable_webhook_is_marked_failed(server: LiveServer, receiver: Receiver) -> None:
    receiver.close()
    run_id, _ = setup_run(server, receiver)
    post_loss(server, run_id, [0.5, 2.0])
    (alert,) = wait_for("delivery", lambda: settled(server, run_id))
    assert alert["delivery_status"] == "failed" and alert["delivery_error"]


def test_a_hanging_webhook_does_not_hold_up_ingestion(server: LiveServer, receiver: Receiver) -> None:
    """The receiver holds the request open; batches are still accepted meanwhile, and the alert is delivered later."""
    run_id, _ = setup_run(server, receiver)
    receiver.release.clear()
    post_loss(server, run_id, [0.5, 2.0])
    wait_for("the webhook request to reach the receiver", receiver.waiting.is_set)
    for start in range(2, 12, 2):
        post_loss(server, run_id, [0.5, 0.5], start=start)
    assert receiver.bodies == [], "the webhook request is still held open"
    assert alerts_of(server, run_id)[0]["delivery_status"] == "pending"
    receiver.release.set()
    (alert,) = wait_for("delivery", lambda: settled(server, run_id))
    assert alert["delivery_status"] == "delivered"
    last = httpx.get(f"{server.url}/api/v1/runs/{run_id}").json()["last_step"]
    assert last == 11


def test_pending_delivery_survives_a_server_crash(server: LiveServer, receiver: Receiver) -> None:
    """Killed while a webhook is in flight, the restarted server re-sends the still-pending alert."""
    run_id, _ = setup_run(server, receiver)
    receiver.release.clear()
    post_loss(server, run_id, [0.5, 2.0])
    wait_for("the webhook request to reach the receiver", receiver.waiting.is_set)
    server.kill()
    receiver.release.set()
    server.start()
    (alert,) = wait_for("delivery after the restart", lambda: settled(server, run_id))
    assert alert["delivery_status"] == "delivered" and alert["delivery_attempts"] >= 1
    assert {b["alert"]["id"] for b in receiver.bodies} == {alert["id"]}


def test_rule_names_keys_and_projects_arrive_in_slack_text_as_typed(server: LiveServer, receiver: Receiver) -> None:
    """Slack mrkdwn in user text (a mention, a disguised link, an entity) is escaped, never obeyed."""
    project, name, key = "p<!everyone>", "<!channel> <http://evil.example|click here> &amp;", "loss<!here>"
    run_id = httpx.post(f"{server.url}/api/v1/runs", json={"project": project, "name": "r"}).json()["run_id"]
    rule = httpx.post(
        f"{server.url}/api/v1/alert-rules",
        json={
            "name": name,
            "project": project,
            "run_id": run_id,
            "cooldown_s": 0,
            "condition": {"type": "threshold", "key": key, "op": ">", "value": 1.0},
            "channels": ["webhook"],
            "webhook_url": receiver.url,
        },
    )
    assert rule.status_code == 201, rule.text
    body = {"batch_id": uuid.uuid4().hex, "records": [{"step": 0, "time": 1.7e9, "scalars": {key: 2.0}}]}
    assert httpx.post(f"{server.url}/api/v1/runs/{run_id}/records", json=body, timeout=30).status_code == 200
    wait_for("delivery", lambda: settled(server, run_id))
    (delivered,) = receiver.bodies
    text = delivered["text"]
    assert "&lt;!channel&gt; &lt;http://evil.example|click here&gt; &amp;amp;" in text
    assert "loss&lt;!here&gt;" in text and "p&lt;!everyone&gt;" in text
    for raw in ("<!channel>", "<!here>", "<!everyone>", "<http://evil.example", "&amp; "):
        assert raw not in text, raw
    assert delivered["alert"]["rule_name"] == name and delivered["alert"]["project"] == project  # data, as given
