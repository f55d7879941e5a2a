"""The background thread: batch queued records, send them, spool and replay what does not get through.

Per response of the server:

- 2xx: delivered (the server counts duplicates of a retried batch and stores nothing twice).
- connection error, timeout, 408, 429, 5xx: the batch goes to the spool and the thread backs
  off (exponential, full jitter, capped); later batches also go to the spool, oldest first,
  until a replay gets through.
- 404 on records: the server does not know the run (it was down when the run started):
  create it, then replay.
- 400, 413, 422 on a batch of several records: split it in halves and send each, so one bad
  record does not take its neighbours down; a single refused record, and 401/403 on any
  batch, is kept under `<spool>/rejected/` with the server's reason, logged, never retried.
- 2xx listing `rejected` items (a bad key, a bad histogram): the rest of the batch is
  stored; only the refused items are kept under `<spool>/rejected/`, with a warning once
  per key.

A rewind (`mhpo.init(..., resume_from_step=N)`) goes through the same queue: sent at once
when nothing is spooled, else spooled behind the older batches, and the records logged
after it are spooled behind it, so the server always sees them in order.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mhpo.client._spool import RUN_META, STATUS_META, Spool, SpooledBatch

logger = logging.getLogger("mhpo.client")

REPLAY_HEADER = "X-MHPO-Replay"
POLL_S = 0.02
SPLIT_STATUSES = frozenset({400, 413, 422})


def _spelled(key: str) -> str:
    """`key` as the server names it in `rejected`: lone surrogates as U+FFFD."""
    return key.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class Outcome(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    MISSING_RUN = "missing_run"
    SPLIT = "split"
    REJECT = "reject"


def classify(status: int, n_records: int = 1) -> Outcome:
    """What to do with a batch after the server answered `status`."""
    if 200 <= status < 300:
        return Outcome.OK
    if status in (408, 429) or status >= 500:
        return Outcome.RETRY
    if status == 404:
        return Outcome.MISSING_RUN
    if status in SPLIT_STATUSES and n_records > 1:
        return Outcome.SPLIT
    return Outcome.REJECT


def _jsonable(value: Any) -> Any:
    """numpy arrays and scalars, torch tensors: anything with `tolist()`."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable (use float, int, str, list or dict)")


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(record, default=_jsonable, allow_nan=True, separators=(",", ":")).encode()


def batch_body(batch_id: str, records: list[bytes]) -> bytes:
    return b'{"batch_id":"' + batch_id.encode() + b'","records":[' + b",".join(records) + b"]}"


def split_body(body: bytes) -> list[tuple[str, list[bytes]]]:
    """Halve a batch body; each half gets a new batch id (the server stored nothing of the original)."""
    records = [encode_record(r) for r in json.loads(body)["records"]]
    mid = len(records) // 2
    return [(str(uuid.uuid4()), part) for part in (records[:mid], records[mid:]) if part]


def _reason(response: httpx.Response) -> str:
    text = response.text.strip()
    return f"HTTP {response.status_code}: {text[:2000] or response.reason_phrase}"


@dataclass
class Control:
    """A message from the caller's thread: flush (and, if `status` is set, finish) by `deadline`.

    With `replay=False` the records queued before it are only sent or spooled: an outage does
    not make the caller wait for the spool to drain.
    """

    deadline: float
    status: str | None = None
    replay: bool = True
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Counters:
    sent_records: int = 0
    duplicate_items: int = 0
    dropped_records: int = 0
    rejected_records: int = 0
    rejected_items: int = 0
    replayed_batches: int = 0
    status_delivered: bool = False


class Sender(threading.Thread):
    """Sends one run's records; once started, the only thread that uses its HTTP client or writes its spool."""

    def __init__(
        self,
        *,
        run_id: str,
        run_request: dict[str, Any],
        created: bool,
        records: deque[Any],
        client: httpx.Client,
        spool: Spool,
        batch_size: int,
        max_batch_bytes: int,
        flush_interval: float,
        max_backoff: float,
    ) -> None:
        super().__init__(name=f"mhpo-sender-{run_id[:8]}", daemon=True)
        self.run_id = run_id
        self.run_request = run_request
        self.created = created
        self.records = records
        self.client = client
        self.spool = spool
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.flush_interval = flush_interval
        self.max_backoff = max_backoff
        self.counters = Counters()
        self._failures = 0
        self._retry_at = 0.0
        self._orphans_pending = True
        self._spooled = len(spool.batches(run_id))
        self._warned_keys: set[tuple[str, str | None]] = set()

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        pending: list[bytes] = []
        pending_bytes = 0
        pending_since = 0.0
        while True:
            controls: list[Control] = []
            try:
                while self.records:
                    item = self.records.popleft()
                    if isinstance(item, Control):
                        controls.append(item)
                        continue
                    encoded = self._encode(item)
                    if encoded is None:
                        continue
                    if not pending:
                        pending_since = time.monotonic()
                    pending.append(encoded)
                    pending_bytes += len(encoded)
                    if len(pending) >= self.batch_size or pending_bytes >= self.max_batch_bytes:
                        self._deliver(str(uuid.uuid4()), pending)
                        pending, pending_bytes = [], 0
                    if len(pending) % 64 == 0:
                        time.sleep(0)  # hand the GIL back to the training thread now and then
                if pending and (controls or time.monotonic() - pending_since >= self.flush_interval):
                    self._deliver(str(uuid.uuid4()), pending)
                    pending, pending_bytes = [], 0
                if self._backlog() and time.monotonic() >= self._retry_at:
                    self._replay()
                for control in controls:
                    self._flush(control)
            except Exception:
                logger.exception("mhpo sender for run %s hit an unexpected error; continuing", self.run_id)
                self._back_off()
            for control in controls:
                control.done.set()
            if any(control.status is not None for control in controls):
                return
            time.sleep(self._wait_time(pending_since if pending else None))

    def _wait_time(self, pending_since: float | None) -> float:
        """Poll the buffer every POLL_S at most; sooner when a batch or a retry is due."""
        now = time.monotonic()
        wake = now + POLL_S
        if pending_since is not None:
            wake = min(wake, pending_since + self.flush_interval)
        if self._backlog():
            wake = min(wake, self._retry_at)
        return max(wake - now, 0.0)

    def _encode(self, record: dict[str, Any]) -> bytes | None:
        try:
            return encode_record(record)
        except (TypeError, ValueError) as exc:
            self.counters.dropped_records += 1
            logger.error(
                "mhpo run %s: dropping step %s, it cannot be sent as JSON: %s", self.run_id, record.get("step"), exc
            )
            return None

    def _backlog(self) -> bool:
        return self._spooled > 0 or not self.created or self._orphans_pending

    def _back_off(self) -> None:
        self._failures += 1
        delay = min(self.max_backoff, 0.25 * 2 ** min(self._failures, 20)) * random.uniform(0.5, 1.0)
        self._retry_at = time.monotonic() + delay

    def _online(self) -> None:
        self._failures = 0
        self._retry_at = 0.0

    # ---- HTTP -----------------------------------------------------------------------------

    def _post_records(
        self, run_id: str, body: bytes, n_records: int, replay: bool
    ) -> tuple[Outcome, httpx.Response | None]:
        headers = {"Content-Type": "application/json"}
        if replay:
            headers[REPLAY_HEADER] = "1"
        try:
            response = self.client.post(f"/api/v1/runs/{run_id}/records", content=body, headers=headers)
        except httpx.HTTPError as exc:
            logger.debug("mhpo run %s: records not delivered (%s); spooling", run_id, exc)
            return Outcome.RETRY, None
        outcome = classify(response.status_code, n_records)
        if outcome is Outcome.OK:
            try:
                answer = json.loads(response.text)
                duplicates, rejected = int(answer.get("duplicates", 0)), list(answer.get("rejected") or [])
            except (ValueError, AttributeError, TypeError):
                duplicates, rejected = 0, []  # the counts are informational; the records are stored either way
            if run_id == self.run_id:
                self.counters.sent_records += n_records
                self.counters.duplicate_items += duplicates
            if rejected:
                self._keep_refused_items(run_id, body, rejected)
        return outcome, response

    def _keep_refused_items(self, run_id: str, body: bytes, rejected: list[dict[str, Any]]) -> None:
        """Keep the items the server refused one by one (the rest is stored) under rejected/, warning once per key."""
        try:
            records = {r["step"]: r for r in json.loads(body)["records"]}
        except (ValueError, KeyError, TypeError):
            records = {}
        kept: dict[int | None, dict[str, Any]] = {}
        for item in rejected:
            step, field_name, key = item.get("step"), item.get("field"), item.get("key")
            source = records.get(step, {})
            record = kept.setdefault(step, {"step": step, "time": source.get("time")})
            if field_name == "outliers":
                record["outliers"] = source.get("outliers", [])
            elif field_name in ("scalars", "histograms"):
                sent = source.get(field_name, {})
                # The server names a key holding lone surrogates with U+FFFD in their place: keep the key as sent.
                key = key if key in sent else next((k for k in sent if _spelled(k) == key), key)
                record.setdefault(field_name, {})[key] = sent.get(key)
        reason = "\n".join(json.dumps(item, allow_nan=True) for item in rejected)
        batch_id = str(uuid.uuid4())
        path = self.spool.reject_body(
            run_id, batch_id, len(kept), batch_body(batch_id, [encode_record(r) for r in kept.values()]), reason
        )
        if run_id == self.run_id:
            self.counters.rejected_items += len(rejected)
        for item in rejected:
            where = (str(item.get("field")), item.get("key"))
            if where in self._warned_keys:
                continue
            self._warned_keys.add(where)
            logger.warning(
                "mhpo server refused %s %r of run %s at step %s (%s); the step's other items are stored, the refused "
                "ones kept at %s. Later refusals of this key are counted, not logged.",
                where[0],
                where[1],
                run_id,
                item.get("step"),
                item.get("reason"),
                path,
            )

    def _post_rewind(self, run_id: str, step: int) -> tuple[Outcome, httpx.Response | None]:
        try:
            response = self.client.post(f"/api/v1/runs/{run_id}/rewind", json={"step": step})
        except httpx.HTTPError as exc:
            logger.debug("mhpo run %s: rewind to step %d not delivered (%s); spooling", run_id, step, exc)
            return Outcome.RETRY, None
        return classify(response.status_code), response

    def rewind(self, step: int) -> tuple[Outcome, httpx.Response | None]:
        """Before `start()`: rewind the run now, or spool the rewind behind the older spooled batches.

        Returns OK once sent or spooled; any other outcome is the server's refusal.
        """
        if self.created and not self._spooled:
            outcome, response = self._post_rewind(self.run_id, step)
            if outcome is not Outcome.RETRY:
                return outcome, response
        if not self.spool.write_rewind(self.run_id, step):
            raise OSError(f"the rewind of run {self.run_id} to step {step} cannot be spooled under {self.spool.root}")
        self._spooled += 1
        return Outcome.OK, None

    def create_run(self, request: dict[str, Any]) -> tuple[Outcome, httpx.Response | None]:
        """POST the run; an existing run with this id (a restarted trainer) counts as created."""
        try:
            response = self.client.post(
                "/api/v1/runs", content=encode_record(request), headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:
            logger.debug("mhpo run %s: not created yet (%s)", request.get("run_id"), exc)
            return Outcome.RETRY, None
        if response.status_code == 409:
            return Outcome.OK, response
        outcome = classify(response.status_code)
        return (Outcome.REJECT if outcome is Outcome.MISSING_RUN else outcome), response

    def _patch_status(self, run_id: str, status: str) -> tuple[Outcome, httpx.Response | None]:
        try:
            response = self.client.patch(f"/api/v1/runs/{run_id}", json={"status": status})
        except httpx.HTTPError:
            return Outcome.RETRY, None
        return classify(response.status_code), response

    # ---- delivery -------------------------------------------------------------------------

    def _deliver(self, batch_id: str, records: list[bytes]) -> None:
        """Send a new batch now, or spool it behind older ones while the server is away."""
        body = batch_body(batch_id, records)
        if self._spooled or not self.created or time.monotonic() < self._retry_at:
            self._to_spool(batch_id, len(records), body)
            return
        outcome, response = self._post_records(self.run_id, body, len(records), replay=False)
        if outcome is Outcome.OK:
            self._online()
        elif outcome is Outcome.RETRY:
            self._to_spool(batch_id, len(records), body)
            self._back_off()
        elif outcome is Outcome.MISSING_RUN:
            self._lost_run()
            self._to_spool(batch_id, len(records), body)
        elif outcome is Outcome.SPLIT:
            for part_id, part in split_body(body):
                self._deliver(part_id, part)
        else:
            self._reject_new(batch_id, len(records), body, response)

    def _to_spool(self, batch_id: str, n_records: int, body: bytes) -> None:
        if self.spool.write_batch(self.run_id, batch_id, n_records, body):
            self._spooled += 1
        else:
            self.counters.dropped_records += n_records

    def _lost_run(self) -> None:
        """The server answered 404 for our run: create it again before the next replay."""
        self.created = False
        self.spool.write_meta(self.run_id, RUN_META, self.run_request)

    def _reject_new(self, batch_id: str, n_records: int, body: bytes, response: httpx.Response | None) -> None:
        reason = _reason(response) if response is not None else "refused"
        kept = self.spool.reject_body(self.run_id, batch_id, n_records, body, reason)
        self._log_rejected(self.run_id, n_records, reason, kept)

    def _log_rejected(self, run_id: str, n_records: int, reason: str, kept: Path | None) -> None:
        if run_id == self.run_id:
            self.counters.rejected_records += n_records
        logger.error(
            "mhpo server refused %d record(s) of run %s (%s); not retried, kept at %s. "
            "Fix the input (or the token: MHPO_TOKEN needs the write scope) and re-send if needed.",
            n_records,
            run_id,
            reason,
            kept,
        )

    # ---- replay ---------------------------------------------------------------------------

    def _replay(self) -> None:
        """Replay our own spool, then what dead processes left for this server."""
        if self._replay_run(self.run_id, own=True) and self._orphans_pending:
            for run_id in self.spool.other_runs(self.run_id):
                lock = self.spool.lock(run_id)
                if lock is None:
                    continue  # a live process owns it and replays it itself
                try:
                    done = self._replay_run(run_id, own=False)
                    if done:
                        self.spool.remove_run_dir_if_empty(run_id)
                finally:
                    lock.release()
                if not done:
                    return
            self._orphans_pending = False

    def _replay_run(self, run_id: str, *, own: bool) -> bool:
        """Create the run if needed, send its batches oldest first, then its final status; False on an outage."""
        if not own or not self.created:
            request = self.run_request if own else self.spool.read_meta(run_id, RUN_META)
            if request is not None:
                outcome, response = self.create_run(request)
                if outcome is Outcome.RETRY:
                    self._back_off()
                    return False
                if outcome is not Outcome.OK:
                    reason = _reason(response) if response is not None else "refused"
                    logger.error(
                        "mhpo server refused to create run %s (%s); its spooled batches are set aside", run_id, reason
                    )
                    for batch in self.spool.batches(run_id):
                        self._log_rejected(run_id, batch.records, reason, self.spool.reject(run_id, batch, reason))
                        if own:
                            self._spooled -= 1
                    self.spool.remove_meta(run_id, RUN_META)
                    if own:
                        self.created = True  # nothing more can be done for it; stop retrying
                    return True
                self.spool.remove_meta(run_id, RUN_META)
                if own:
                    self.created = True
        batches = self.spool.batches(run_id)
        while batches:
            batch = batches.pop(0)
            result = self._replay_batch(run_id, batch)
            if result is None:
                return False
            if own:
                self._spooled -= 1
            if result:
                batches = self.spool.batches(run_id)  # the batch was split into new files
                if own:
                    self._spooled = len(batches)
        if own:
            self._spooled = 0
        self._online()
        if not own:
            status = self.spool.read_meta(run_id, STATUS_META)
            if status is not None and "status" in status:
                outcome, _ = self._patch_status(run_id, str(status["status"]))
                if outcome is Outcome.RETRY:
                    self._back_off()
                    return False
                self.spool.remove_meta(run_id, STATUS_META)
        return True

    def _replay_batch(self, run_id: str, batch: SpooledBatch) -> bool | None:
        """Send one spooled batch (or rewind); None on an outage, True if it was split into new files."""
        try:
            body = batch.path.read_bytes()
        except FileNotFoundError:
            return False
        if batch.rewind:
            try:
                step = int(json.loads(body)["step"])
            except (ValueError, KeyError, TypeError):
                step = None
            outcome, response = (Outcome.REJECT, None) if step is None else self._post_rewind(run_id, step)
        else:
            outcome, response = self._post_records(run_id, body, batch.records, replay=True)
        if outcome is Outcome.OK:
            self.counters.replayed_batches += 1
            self.spool.remove(batch.path)
            return False
        if outcome is Outcome.RETRY:
            self._back_off()
            return None
        if outcome is Outcome.MISSING_RUN:
            if run_id == self.run_id:
                self._lost_run()
                self._back_off()
                return None
            outcome = Outcome.REJECT
        if outcome is Outcome.SPLIT and not batch.rewind:
            try:
                parts = split_body(body)
            except ValueError:  # not a batch at all (damaged on disk): set it aside below
                parts = []
            if parts:
                for part_id, part in parts:
                    self.spool.write_batch(run_id, part_id, len(part), batch_body(part_id, part))
                self.spool.remove(batch.path)
                return True
        reason = _reason(response) if response is not None else "refused"
        if batch.rewind:
            logger.error(
                "mhpo server refused the spooled rewind of run %s (%s); not retried, kept at %s",
                run_id,
                reason,
                self.spool.reject(run_id, batch, reason),
            )
            return False
        self._log_rejected(run_id, batch.records, reason, self.spool.reject(run_id, batch, reason))
        return False

    # ---- flush and finish -----------------------------------------------------------------

    def _flush(self, control: Control) -> None:
        """Retry until our backlog is delivered or the deadline passes, then deliver the final status."""
        if not control.replay:
            return
        self._retry_at = 0.0
        while self._backlog():
            now = time.monotonic()
            if now >= control.deadline:
                break
            if now >= self._retry_at:
                self._replay()
            else:
                time.sleep(min(self._retry_at, control.deadline) - now)
        if control.status is None:
            return
        keep = True
        if self.created and not self._spooled:
            outcome, response = self._patch_status(self.run_id, control.status)
            self.counters.status_delivered = outcome is Outcome.OK
            if outcome not in (Outcome.OK, Outcome.RETRY):
                keep = False  # refused: a replay would be refused again
                logger.error(
                    "mhpo server refused status %r for run %s (%s)",
                    control.status,
                    self.run_id,
                    _reason(response) if response is not None else "refused",
                )
        if keep and not self.counters.status_delivered:
            self.spool.write_meta(self.run_id, STATUS_META, {"status": control.status})
