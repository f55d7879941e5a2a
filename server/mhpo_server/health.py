"""What `/healthz` reports beyond "the process answers": the database, the last write, the ingest listeners.

An ingest listener (flags, alert rules) runs after its batch is committed, so its failure
cannot change the answer to the client; it is made visible instead: counted in
`/metrics` (`mhpo_ingest_listener_errors_total`), reported by `/healthz` until the
listener succeeds again, and stored as a `listener_error` event on the run (severity
warning, so the run shows an open flag in the dashboard).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from mhpo_server.metrics import ServiceMetrics
from mhpo_server.schemas import SURROGATE_RE, RecordIn
from mhpo_server.store import Store, StoreError

log = logging.getLogger(__name__)
LISTENER_EVENT_KIND = "listener_error"


def listener_name(listener: Any) -> str:
    return str(getattr(listener, "__qualname__", None) or type(listener).__qualname__)


class ListenerHealth:
    """Per listener: failures so far, the latest failure, whether its latest call succeeded (thread-safe)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._state: dict[str, dict[str, Any]] = {}

    def succeeded(self, listener: Any) -> None:
        name = listener_name(listener)
        with self._lock:
            if name in self._state:
                self._state[name]["ok"] = True

    def failed(self, listener: Any, store: Store, run_id: str, records: Sequence[RecordIn], exc: BaseException) -> None:
        """Count, log and report the failure, and leave a `listener_error` event on the run."""
        name = listener_name(listener)
        step = min((r.step for r in records), default=0)
        error = SURROGATE_RE.sub("\ufffd", f"{type(exc).__name__}: {exc}")[:500]
        self.metrics.listener_errors.labels(name).inc()
        log.error(
            "ingest listener %s failed on run %s at step %d (the batch is stored)", name, run_id, step, exc_info=exc
        )
        with self._lock:
            state = self._state.setdefault(name, {"failures": 0})
            state.update(
                ok=False,
                failures=state["failures"] + 1,
                last_failure={"run_id": run_id, "step": step, "error": error, "at": time.time()},
            )
        message = (
            f"{name} failed on the batch from step {step}, which is stored: flags and alerts may be missing ({error})"
        )
        try:
            store.add_events(
                run_id,
                [
                    {
                        "step": step,
                        "kind": LISTENER_EVENT_KIND,
                        "severity": "warning",
                        "detector": name[:200],
                        "message": message,
                    }
                ],
            )
        except (StoreError, ValueError) as event_exc:
            log.error("could not store the listener_error event of run %s: %s", run_id, event_exc)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: dict(state) for name, state in self._state.items()}
