"""Webhook delivery on background workers, so ingestion never waits for a receiver.

`submit` only enqueues. Each of `workers` threads POSTs a Slack-compatible JSON body
(`{"text": ...}`, its user text escaped for Slack's mrkdwn, plus the structured alert under
`"alert"`) and keeps only what it needs
of the reply: the status line and headers, at most `read_limit` bytes read from the
socket, never the body. A receiver cannot hold a worker beyond `deadline_s` seconds in
all (name lookup, connect, TLS, send, reply), however slowly it trickles bytes.

Every connection goes through the target policy (`targets.py`): the host is resolved
once, every address checked, and the socket opened to a checked address (TLS still
verifies the URL's host name). Proxies from the environment are not used.

A failure (refused target, no reply, non-2xx) is retried up to `max_attempts` in all,
after `backoff_s * 2**(attempt - 1)` seconds, without holding up other deliveries. The
stored error is short and fixed in form: `HTTP 503 Service Unavailable`, or one message
for every connection failure, so the receiver's text never reaches `GET /api/v1/alerts`
and the error does not tell an open port from a closed one. The queue holds at most
`queue_size` deliveries (waiting retries included); when it is full a new delivery is
marked `failed` at once (the alert itself is stored and shown) and counted in
`mhpo_webhook_deliveries_total{result="dropped"}`. Alerts still `pending` when the server
starts are re-sent.
"""

from __future__ import annotations

import contextlib
import heapq
import http
import itertools
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import certifi
import httpcore
from prometheus_client import CollectorRegistry, Counter, Gauge

from mhpo import __version__
from mhpo_server.monitoring.schemas import Alert
from mhpo_server.monitoring.targets import TargetPolicy, TargetRefused
from mhpo_server.store import AlertStore

log = logging.getLogger(__name__)

SEVERITY_ICON = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}


def slack_text(text: str) -> str:
    """`text` as Slack's mrkdwn shows it literally: its control characters `&`, `<`, `>` escaped.

    A rule name, key or project holding `<!channel>` or `<http://x|click>` then arrives as that
    text, never as a mention or a disguised link.
    """
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def payload(alert: Alert, base_url: str | None = None) -> dict[str, Any]:
    """The POST body: Slack reads `text` (user text escaped; the run link is ours); other receivers read `alert`."""
    run = alert.run_id
    where = f" <{base_url.rstrip('/')}/runs/{run}|run {run[:8]}>" if base_url else f" run {run}"
    icon = SEVERITY_ICON.get(alert.severity, "")
    text = f"{icon} [{alert.severity}] {slack_text(alert.message)} ({slack_text(alert.project)},{where})".strip()
    delivery = {"delivery_status", "delivery_attempts", "delivery_error", "delivered_at"}
    return {"text": text, "alert": alert.model_dump(mode="json", exclude=delivery)}


class ReplyTooLarge(Exception):
    """The receiver sent more than `read_limit` bytes before the end of its reply headers."""


class DeadlineExceeded(Exception):
    """The delivery's total time ran out."""


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()  # never the process-wide default: several apps per process in tests
        self.deliveries = Counter(
            "mhpo_webhook_deliveries",
            "webhook delivery attempts by result (delivered, retry, failed, dropped: queue full)",
            ["result"],
            registry=registry,
        )
        self.bytes_read = Counter(
            "mhpo_webhook_reply_bytes_read", "bytes read from webhook receivers' replies", registry=registry
        )
        self.queued = Gauge("mhpo_webhook_queue_depth", "deliveries waiting (retries included)", registry=registry)
        self.in_flight = Gauge("mhpo_webhook_in_flight", "deliveries being sent now", registry=registry)


class _Budget:
    """One delivery's deadline and read allowance, shared by its connection's streams."""

    def __init__(self, deadline: float, read_limit: int, metrics: WebhookMetrics) -> None:
        self.deadline = deadline
        self.read_left = read_limit
        self.read_limit = read_limit
        self.metrics = metrics
        self.timers: list[threading.Timer] = []

    def timeout(self, requested: float | None) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded
        return left if requested is None else min(requested, left)

    def watch(self, stream: httpcore.NetworkStream) -> None:
        """Shut the socket at the deadline, whatever call is blocked on it (a TLS read included)."""
        sock = stream.get_extra_info("socket")
        if sock is None:
            return
        timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), _shutdown, (sock,))
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    def close(self) -> None:
        for timer in self.timers:
            timer.cancel()


def _shutdown(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _BoundedStream(httpcore.NetworkStream):
    """A stream whose reads stop at the budget's byte limit and every call at its deadline."""

    def __init__(self, inner: httpcore.NetworkStream, budget: _Budget) -> None:
        self._inner = inner
        self._budget = budget

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        budget = self._budget
        if budget.read_left <= 0:
            raise ReplyTooLarge
        data = self._inner.read(min(max_bytes, budget.read_left), budget.timeout(timeout))
        budget.read_left -= len(data)
        budget.metrics.bytes_read.inc(len(data))
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._budget.timeout(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, self._budget.timeout(timeout))
        return _BoundedStream(inner, self._budget)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses the policy allows: resolved once, each checked, then dialled by number."""

    def __init__(self, policy: TargetPolicy, budget: _Budget, resolver: ThreadPoolExecutor) -> None:
        self.policy = policy
        self.budget = budget
        self.resolver = resolver

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self.policy.resolve(host, port, self.resolver, self.budget.timeout(timeout))
        for i, address in enumerate(addresses):
            try:
                stream = super().connect_tcp(address, port, self.budget.timeout(timeout), local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                if i == len(addresses) - 1:
                    raise
                continue
            self.budget.watch(stream)
            return _BoundedStream(stream, self.budget)
        raise httpcore.ConnectError("no address")

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise TargetRefused("unix sockets are not webhook targets")


@dataclass(order=True)
class _Job:
    due: float
    seq: int
    alert_id: int = 0
    url: str = ""
    body: bytes = b""
    attempt: int = 1


class WebhookDispatcher:
    def __init__(
        self,
        store: AlertStore,
        deadline_s: float = 5.0,
        max_attempts: int = 4,
        backoff_s: float = 1.0,
        base_url: str | None = None,
        policy: TargetPolicy | None = None,
        workers: int = 4,
        queue_size: int = 1000,
        read_limit: int = 8192,
        metrics: WebhookMetrics | None = None,
        ca_bundle: str | None = None,
    ) -> None:
        self.store = store
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.base_url = base_url
        self.policy = policy or TargetPolicy()
        self.workers = workers
        self.queue_size = queue_size
        self.read_limit = read_limit
        self.metrics = metrics or WebhookMetrics()
        self._heap: list[_Job] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self._inflight = 0
        self._threads: list[threading.Thread] = []
        self._resolver = ThreadPoolExecutor(workers, thread_name_prefix="mhpo-webhook-dns")
        # HTTPS receivers are verified against certifi's public CAs, or only those of `ca_bundle` (a PEM file).
        self._ssl = ssl.create_default_context(cafile=ca_bundle or certifi.where())

    def start(self) -> None:
        """Start the worker threads (done by the first `submit`)."""
        with self._cv:
            if self._threads:
                return
            self._stop = False
            for i in range(self.workers):
                thread = threading.Thread(target=self._run, name=f"mhpo-webhooks-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
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

    def submit(self, alert: Alert, url: str, attempt: int = 1) -> bool:
        """Queue the delivery of `alert` to `url`; returns at once, False when the queue was full."""
        self.start()
        body = json.dumps(payload(alert, self.base_url)).encode()
        job = _Job(time.monotonic(), next(self._seq), alert.id, url, body, attempt)
        if self._push(job):
            return True
        self._record(job.alert_id, "failed", attempt - 1, self._full_message(), "dropped")
        return False

    def _full_message(self) -> str:
        return (
            f"not sent: the webhook queue was full ({self.queue_size} deliveries waiting); "
            "raise MHPO_WEBHOOK_QUEUE_SIZE or MHPO_WEBHOOK_WORKERS"
        )

    def _push(self, job: _Job) -> bool:
        with self._cv:
            if len(self._heap) >= self.queue_size:
                return False
            heapq.heappush(self._heap, job)
            self.metrics.queued.set(len(self._heap))
            self._cv.notify()
            return True

    def idle(self) -> bool:
        """True when nothing is queued, being sent or waiting for a retry."""
        with self._cv:
            return not self._heap and not self._inflight

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._heap or self._heap[0].due > time.monotonic()):
                    wait = self._heap[0].due - time.monotonic() if self._heap else None
                    self._cv.wait(wait)
                if self._stop:
                    return
                job = heapq.heappop(self._heap)
                self.metrics.queued.set(len(self._heap))
                self._inflight += 1
                self.metrics.in_flight.set(self._inflight)
            try:
                self._deliver(job)
            finally:
                with self._cv:
                    self._inflight -= 1
                    self.metrics.in_flight.set(self._inflight)

    def send(self, url: str, body: bytes) -> str | None:
        """POST `body` to `url` under the policy, the deadline and the read limit; the error, or None on 2xx."""
        budget = _Budget(time.monotonic() + self.deadline_s, self.read_limit, self.metrics)
        backend = _GuardedBackend(self.policy, budget, self._resolver)
        headers = [("Content-Type", "application/json"), ("User-Agent", f"mhpo-monitor/{__version__}")]
        timeouts = {
            "connect": self.deadline_s,
            "read": self.deadline_s,
            "write": self.deadline_s,
            "pool": self.deadline_s,
        }
        try:
            with (
                httpcore.ConnectionPool(
                    ssl_context=self._ssl, network_backend=backend, retries=0, max_connections=1
                ) as pool,
                pool.stream("POST", url, headers=headers, content=body, extensions={"timeout": timeouts}) as reply,
            ):
                status = reply.status
        except TargetRefused as exc:
            return f"refused by the webhook target policy: {exc}"
        except ReplyTooLarge:
            return f"the reply headers exceed {self.read_limit} bytes (MHPO_WEBHOOK_READ_LIMIT_BYTES)"
        except httpcore.UnsupportedProtocol:
            return "the URL is not an http:// or https:// URL"
        except (
            DeadlineExceeded,
            httpcore.TimeoutException,
            httpcore.NetworkError,
            httpcore.ProtocolError,
            OSError,
        ) as exc:
            log.info("webhook to %s: %s: %s", url, type(exc).__name__, exc)
            return f"no HTTP reply within {self.deadline_s:g} s (connection failed, closed, too slow or not HTTP)"
        finally:
            budget.close()
        if 200 <= status < 300:
            return None
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "non-standard status"
        return f"HTTP {status} {phrase}"

    def _deliver(self, job: _Job) -> None:
        try:
            error = self.send(job.url, job.body)
        except Exception:
            log.exception("webhook delivery of alert %s failed unexpectedly", job.alert_id)
            error = "internal error while sending (see the server log)"
        if error is None:
            self._record(job.alert_id, "delivered", job.attempt, None, "delivered")
        elif job.attempt >= self.max_attempts:
            log.warning("webhook for alert %s failed after %s attempts: %s", job.alert_id, job.attempt, error)
            self._record(job.alert_id, "failed", job.attempt, error, "failed")
        else:
            self._record(job.alert_id, "pending", job.attempt, error, "retry")  # before the retry can run
            delay = self.backoff_s * 2 ** (job.attempt - 1)
            retry = _Job(time.monotonic() + delay, next(self._seq), job.alert_id, job.url, job.body, job.attempt + 1)
            if not self._push(retry):
                self._record(job.alert_id, "failed", job.attempt, f"{error}; {self._full_message()}", "dropped")

    def _record(self, alert_id: int, status: str, attempts: int, error: str | None, result: str) -> None:
        self.metrics.deliveries.labels(result).inc()
        try:
            self.store.set_delivery(alert_id, status, attempts, error)
        except Exception:
            log.exception("could not record the webhook delivery of alert %s", alert_id)
