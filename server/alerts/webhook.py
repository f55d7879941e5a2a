"""Webhook delivery on a background thread, so ingestion never waits for a receiver.

`submit` only enqueues. The worker POSTs a Slack-compatible JSON body (`{"text": ...}`
plus the structured alert under `"alert"`), with a per-request `timeout_s`; a failure (a
connection error, a timeout or a non-2xx answer) is retried up to `max_attempts` in all,
after `backoff_s * 2**(attempt - 1)` seconds, without holding up other deliveries. The
status (`pending` -> `delivered` | `failed`), the attempt count and the last error are
stored on the alert row. Alerts still `pending` when the server starts are re-sent.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from server.alerts.schemas import Alert
from server.alerts.store import AlertStore

log = logging.getLogger(__name__)

SEVERITY_ICON = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}


def payload(alert: Alert, base_url: str | None = None) -> dict[str, Any]:
    """The POST body: Slack reads `text`; other receivers read the structured `alert`."""
    run = alert.run_id
    where = f" <{base_url.rstrip('/')}/runs/{run}|run {run[:8]}>" if base_url else f" run {run}"
    icon = SEVERITY_ICON.get(alert.severity, "")
    text = f"{icon} [{alert.severity}] {alert.message} ({alert.project},{where})".strip()
    delivery = {"delivery_status", "delivery_attempts", "delivery_error", "delivered_at"}
    return {"text": text, "alert": alert.model_dump(mode="json", exclude=delivery)}


@dataclass(order=True)
class _Job:
    due: float
    seq: int
    alert_id: int = 0
    url: str = ""
    body: dict[str, Any] | None = None
    attempt: int = 1


class WebhookDispatcher:
    def __init__(
        self,
        store: AlertStore,
        timeout_s: float = 5.0,
        max_attempts: int = 4,
        backoff_s: float = 1.0,
        base_url: str | None = None,
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.base_url = base_url
        self._heap: list[_Job] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self._inflight = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread (done by the first `submit`)."""
        with self._cv:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="mhpo-webhooks", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def resume_pending(self, urls: dict[int, str]) -> None:
        """Re-enqueue alerts left `pending` (rule id -> webhook URL of the rules that still exist)."""
        for alert in self.store.pending_deliveries():
            url = urls.get(alert.rule_id) if alert.rule_id is not None else None
            if url is None:
                error = "the rule or its webhook_url was removed"
                self.store.set_delivery(alert.id, "failed", alert.delivery_attempts, error)
            else:
                self.submit(alert, url, attempt=alert.delivery_attempts + 1)

    def submit(self, alert: Alert, url: str, attempt: int = 1) -> None:
        """Queue the delivery of `alert` to `url`; returns at once."""
        self.start()
        self._push(_Job(time.monotonic(), next(self._seq), alert.id, url, payload(alert, self.base_url), attempt))

    def _push(self, job: _Job) -> None:
        with self._cv:
            heapq.heappush(self._heap, job)
            self._cv.notify()

    def idle(self) -> bool:
        """True when nothing is queued, being sent or waiting for a retry."""
        with self._cv:
            return not self._heap and not self._inflight

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
            while True:
                with self._cv:
                    while not self._stop and (not self._heap or self._heap[0].due > time.monotonic()):
                        wait = self._heap[0].due - time.monotonic() if self._heap else None
                        self._cv.wait(wait)
                    if self._stop:
                        return
                    job = heapq.heappop(self._heap)
                    self._inflight += 1
                try:
                    self._deliver(client, job)
                finally:
                    with self._cv:
                        self._inflight -= 1

    def _deliver(self, client: httpx.Client, job: _Job) -> None:
        error: str | None = None
        try:
            response = client.post(job.url, json=job.body)
            if not response.is_success:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        try:
            if error is None:
                self.store.set_delivery(job.alert_id, "delivered", job.attempt, None)
            elif job.attempt >= self.max_attempts:
                log.warning("webhook for alert %s failed after %s attempts: %s", job.alert_id, job.attempt, error)
                self.store.set_delivery(job.alert_id, "failed", job.attempt, error)
            else:
                self.store.set_delivery(job.alert_id, "pending", job.attempt, error)
                delay = self.backoff_s * 2 ** (job.attempt - 1)
                due = time.monotonic() + delay
                self._push(_Job(due, next(self._seq), job.alert_id, job.url, job.body, job.attempt + 1))
        except Exception:  # noqa: BLE001 - a store hiccup must not kill the worker thread
            log.exception("could not record the webhook delivery of alert %s", job.alert_id)
