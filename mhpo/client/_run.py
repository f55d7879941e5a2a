"""`mhpo.init` and `Run`: stream training statistics without ever blocking or failing the trainer.

`Run.log` appends one record to a bounded in-memory buffer and returns (microseconds); a
daemon thread (`_sender.Sender`) polls it, batches, sends, retries and spools. The buffer is
a deque: appending takes no lock, so `log` never waits for the sender thread. The run id is made
here (uuid4), so a run starts even while the server is down; the server gets the run when
it comes back. Configuration errors the server reports at `init` (a bad token, an invalid
name) raise at once: an outage never does.
"""

from __future__ import annotations

import atexit
import logging
import operator
import os
import sys
import threading
import time as _time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import platformdirs

from mhpo.client._sender import Control, Outcome, Sender, _reason, encode_record
from mhpo.client._spool import RUN_META, STATUS_META, Spool

logger = logging.getLogger("mhpo.client")

DEFAULT_SERVER = "http://127.0.0.1:8765"
DEFAULT_SPOOL_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_BATCH_BYTES = 8 * 1024 * 1024
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_MAX_BACKOFF = 30.0
DEFAULT_EXIT_TIMEOUT = 10.0
DEFAULT_PERSIST_TIMEOUT = 120.0  # before a checkpoint: long enough for a slow disk, never an outage
LOCK_WAIT_S = 5.0
STATUSES = ("running", "finished", "failed", "crashed")


class MHPOClientError(RuntimeError):
    """The server refused to create the run (bad token, invalid field): retrying cannot help."""


@dataclass(frozen=True)
class FinishReport:
    """What `Run.finish` could and could not deliver.

    `duplicate_items` are scalars, histograms or outlier lists the server already had (a
    batch re-sent after a lost reply): stored once, counted here. `spooled_records` are on
    disk under `spool_dir` and are replayed by the next `mhpo.init` pointed at the same
    server (any run); `dropped_records` were lost (spool full, or not JSON-serialisable);
    `rejected_records` were refused by the server (4xx) and kept under
    `<spool root>/rejected/`; `rejected_items` are single scalars, histograms or outlier
    lists the server refused while storing the rest of their record (kept there too).
    `replayed_batches` counts spooled batches (and rewinds) this process delivered, its
    own and those earlier processes left for the server.
    """

    run_id: str
    status: str
    status_delivered: bool
    sent_records: int
    duplicate_items: int
    spooled_batches: int
    spooled_records: int
    dropped_records: int
    rejected_records: int
    rejected_items: int
    replayed_batches: int
    spool_dir: Path

    @property
    def complete(self) -> bool:
        """True when the server has every record and the final status."""
        return (
            self.status_delivered
            and self.spooled_records == 0
            and self.dropped_records == 0
            and self.rejected_records == 0
            and self.rejected_items == 0
        )


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number; set it to e.g. {default:g} or unset it") from None


def default_spool_dir() -> Path:
    """`MHPO_SPOOL_DIR`, else `<user cache dir>/mhpo/spool`."""
    env = os.environ.get("MHPO_SPOOL_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("mhpo")) / "spool"


class Run:
    """One training run streaming to the server; make it with `mhpo.init`.

    `log` may be called from any thread. Records logged after `finish` are ignored with a
    warning. Used as a context manager, the run finishes as "failed" when the block raises.

    `resume_from_step=N` (with the `run_id` of an earlier run) rewinds the run's history to
    end at step N before anything new is logged, so steps after N are logged as new (a
    restart from a checkpoint never mixes two trajectories). While the server is down the
    rewind waits in the spool ahead of the new records and is replayed first.
    """

    def __init__(
        self,
        project: str,
        name: str,
        *,
        config: Mapping[str, Any] | None = None,
        loss: str | None = None,
        server: str | None = None,
        token: str | None = None,
        run_id: str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        request_timeout: float = 10.0,
        resume_from_step: int | None = None,
    ) -> None:
        if resume_from_step is not None:
            if run_id is None:
                raise ValueError("resume_from_step needs the run_id of the run to resume: mhpo.init(..., run_id=...)")
            if type(resume_from_step) is not int or resume_from_step < -1:
                raise ValueError(
                    f"resume_from_step={resume_from_step!r}: give the last step to keep, an int >= 0 "
                    "(or -1 to drop the whole history)"
                )
        if not project or not isinstance(project, str):
            raise ValueError(f"project={project!r}: give a non-empty string, e.g. mhpo.init(project='grpo-math', ...)")
        if not name or not isinstance(name, str):
            raise ValueError(f"name={name!r}: give a non-empty string, e.g. mhpo.init(..., name='mhpo-c1.5')")
        try:
            self.id = str(uuid.UUID(str(run_id))) if run_id is not None else str(uuid.uuid4())
        except ValueError:
            raise ValueError(
                f"run_id={run_id!r} is not a UUID; pass the id of an earlier run or leave it out"
            ) from None
        request = {"run_id": self.id, "project": project, "name": name, "config": dict(config or {}), "loss": loss}
        try:
            encode_record(request)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config={config!r} cannot be sent as JSON: {exc}") from None
        self.project = project
        self.name = name
        self.server = (server or os.environ.get("MHPO_SERVER") or DEFAULT_SERVER).rstrip("/")
        self.url = f"{self.server}/runs/{self.id}"
        token = token or os.environ.get("MHPO_TOKEN") or None
        max_bytes = (
            spool_max_bytes
            if spool_max_bytes is not None
            else int(_env_float("MHPO_SPOOL_MAX_BYTES", DEFAULT_SPOOL_MAX_BYTES))
        )
        self.spool = Spool(Path(spool_dir) if spool_dir is not None else default_spool_dir(), self.server, max_bytes)
        self.spool_dir = self.spool.run_dir(self.id)
        lock = self.spool.lock(self.id)
        give_up = _time.monotonic() + LOCK_WAIT_S
        while lock is None and _time.monotonic() < give_up:  # another process may be replaying its leftovers
            _time.sleep(0.1)
            lock = self.spool.lock(self.id)
        if lock is None:
            raise MHPOClientError(
                f"run_id={self.id!r} is already open in another live process (its spool {self.spool_dir} is locked); "
                "finish it there or pick another run_id"
            )
        self._lock = lock
        self.spool.remove_meta(self.id, STATUS_META)  # this process decides the final status now
        self._buffer: deque[Any] = deque()
        self._queue_size = queue_size
        self._finished: FinishReport | None = None
        self._closing = False
        self._finish_lock = threading.Lock()
        self._warned_full = False
        self._warned_closed = False
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(
            base_url=self.server,
            headers=headers,
            timeout=httpx.Timeout(request_timeout, connect=min(3.0, request_timeout)),
        )
        self._sender = Sender(
            run_id=self.id,
            run_request=request,
            created=False,
            records=self._buffer,
            client=client,
            spool=self.spool,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            flush_interval=flush_interval,
            max_backoff=max_backoff,
        )
        try:
            self._create(request)
            if resume_from_step is not None:
                self._rewind(resume_from_step)
        except BaseException:
            client.close()
            self._lock.release()
            raise
        self._sender.start()
        _live_runs.add(self)

    def _create(self, request: dict[str, Any]) -> None:
        """Try once now; on an outage keep the request in the spool for the sender to replay."""
        outcome, response = self._sender.create_run(request)
        if outcome is Outcome.OK:
            self._sender.created = True
            self.spool.remove_meta(self.id, RUN_META)
        elif outcome is Outcome.RETRY:
            logger.warning(
                "mhpo server %s unreachable (%s); run %s starts anyway, records spool to %s until it is back",
                self.server,
                _reason(response) if response is not None else "no connection",
                self.id,
                self.spool_dir,
            )
            self.spool.write_meta(self.id, RUN_META, request)
        else:
            raise MHPOClientError(
                f"server {self.server} refused to create run {self.id} "
                f"({_reason(response) if response is not None else 'refused'}); "
                "check the token (MHPO_TOKEN, write scope), project, name and config"
            )

    def _rewind(self, step: int) -> None:
        """Rewind now, or queue the rewind in the spool (server down, or older batches still spooled)."""
        outcome, response = self._sender.rewind(step)
        if outcome is not Outcome.OK:
            raise MHPOClientError(
                f"server {self.server} refused to rewind run {self.id} to step {step} "
                f"({_reason(response) if response is not None else 'refused'}); check the token's scope and the run_id"
            )

    def log(
        self,
        step: int,
        scalars: Mapping[str, float] | None = None,
        histograms: Mapping[str, Mapping[str, Any]] | None = None,
        outliers: Sequence[Mapping[str, Any]] | None = None,
        time: float | None = None,
    ) -> None:
        """Queue one step's statistics; never waits for the network and never raises on network errors.

        Scalars are converted to float here (so a tensor is read now, not later); histograms
        and outliers (contract C1 shapes) are taken as given and must not be mutated afterwards.
        Waits only if `queue_size` records are waiting, i.e. the disk cannot keep up.
        """
        if self._closing:
            if not self._warned_closed:
                self._warned_closed = True
                logger.warning("mhpo run %s is finished; log(step=%s) and later calls are ignored", self.id, step)
            return
        if type(step) is not int:
            try:
                step = operator.index(step) if not isinstance(step, bool) else -1
            except TypeError:
                raise ValueError(f"step={step!r}: must be an int >= 0") from None
        if step < 0:
            raise ValueError(f"step={step!r}: must be an int >= 0")
        values: dict[str, float] = {}
        if scalars:
            for key, value in scalars.items():
                try:
                    values[str(key)] = float(value)
                except (TypeError, ValueError):
                    raise TypeError(f"scalars[{key!r}]={value!r}: must be a number (NaN and inf are fine)") from None
        record = {
            "step": step,
            "time": _time.time() if time is None else float(time),
            "scalars": values,
            "histograms": dict(histograms) if histograms else {},
            "outliers": list(outliers) if outliers else [],
        }
        if len(self._buffer) >= self._queue_size:
            self._wait_for_room(step)
        self._buffer.append(record)

    def _wait_for_room(self, step: int) -> None:
        if not self._warned_full:
            self._warned_full = True
            logger.warning(
                "mhpo run %s: %d records are waiting to be sent or spooled; log() now waits for the disk. "
                "Check the spool directory %s",
                self.id,
                self._queue_size,
                self.spool_dir,
            )
        while len(self._buffer) >= self._queue_size:
            if not self._sender.is_alive():
                logger.error("mhpo run %s: the sender thread is gone; step %s is not sent", self.id, step)
                return
            _time.sleep(0.001)

    def flush(self, timeout: float = 30.0) -> bool:
        """Send everything queued so far (spooling what the server does not take); True if nothing is left spooled."""
        if self._closing:
            return not self.spool.batches(self.id)
        control = Control(deadline=_time.monotonic() + timeout)
        self._buffer.append(control)
        control.done.wait(timeout + 5.0)
        return not self.spool.batches(self.id)

    def persist(self, timeout: float = DEFAULT_PERSIST_TIMEOUT) -> bool:
        """Wait until every record logged so far is on the server or in the spool on disk; True if so in time.

        A checkpoint written after this never gets ahead of the run's history: a process killed
        afterwards loses no step up to it. A server outage does not make it wait (the batch goes to
        the spool and the next `mhpo.init` against that server replays it); only a sender stuck
        longer than `timeout` returns False. Records dropped because the spool was full are counted
        in the `FinishReport`.
        """
        if self._closing:
            return True
        if not self._sender.is_alive():
            return False
        control = Control(deadline=_time.monotonic() + timeout, replay=False)
        self._buffer.append(control)
        return control.done.wait(timeout)

    def finish(self, status: str = "finished", timeout: float = 30.0) -> FinishReport:
        """Flush for at most `timeout` seconds, set the run's status, and say what is still spooled.

        Calling it again returns the first report. Whatever could not be delivered stays in
        the spool and is replayed by the next `mhpo.init` against this server.
        """
        if status not in STATUSES:
            raise ValueError(f"status={status!r}: must be one of {', '.join(STATUSES)}")
        with self._finish_lock:
            if self._finished is not None:
                return self._finished
            self._closing = True
            control = Control(deadline=_time.monotonic() + timeout, status=status)
            if self._sender.is_alive():
                self._buffer.append(control)
                control.done.wait(timeout + 10.0)
                self._sender.join(5.0)
            batches = self.spool.batches(self.id)
            counters = self._sender.counters
            report = FinishReport(
                run_id=self.id,
                status=status,
                status_delivered=counters.status_delivered,
                sent_records=counters.sent_records,
                duplicate_items=counters.duplicate_items,
                spooled_batches=len(batches),
                spooled_records=sum(b.records for b in batches),
                dropped_records=counters.dropped_records,
                rejected_records=counters.rejected_records,
                rejected_items=counters.rejected_items,
                replayed_batches=counters.replayed_batches,
                spool_dir=self.spool_dir,
            )
            self._finished = report
            _live_runs.discard(self)
            if report.spooled_records or not report.status_delivered:
                logger.warning(
                    "mhpo run %s: %d records in %d batches still spooled at %s (final status %r %s); "
                    "the next mhpo.init against %s sends them",
                    self.id,
                    report.spooled_records,
                    report.spooled_batches,
                    self.spool_dir,
                    status,
                    "delivered" if report.status_delivered else "spooled too",
                    self.server,
                )
            if not self._sender.is_alive():
                self.spool.remove_run_dir_if_empty(self.id)
                self._sender.client.close()
                self._lock.release()
            return report

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish("failed" if exc_type is not None else "finished")

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, project={self.project!r}, name={self.name!r}, url={self.url!r})"


def init(
    project: str,
    name: str,
    config: Mapping[str, Any] | None = None,
    loss: str | None = None,
    server: str | None = None,
    token: str | None = None,
    run_id: str | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
    resume_from_step: int | None = None,
    **options: Any,
) -> Run:
    """Start (or, with an existing `run_id`, resume) a run and its background sender.

    With `resume_from_step=N` the run's history is rewound to end at step N first (see `Run`).

    `server` defaults to `MHPO_SERVER`, then http://127.0.0.1:8765; `token` to `MHPO_TOKEN`;
    `spool_dir` to `MHPO_SPOOL_DIR`, then the user cache dir. Keyword `options`: see `Run`.
    Spooled batches an earlier process left for this server are replayed in the background.
    """
    _install_exit_hooks()
    return Run(
        project,
        name,
        config=config,
        loss=loss,
        server=server,
        token=token,
        run_id=run_id,
        spool_dir=spool_dir,
        resume_from_step=resume_from_step,
        **options,
    )


def fork(
    run_id: str,
    step: int,
    name: str | None = None,
    server: str | None = None,
    token: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Create a new run sharing `run_id`'s history up to `step`; returns it (the server's Run JSON).

    Continue it with `mhpo.init(run["project"], run["name"], run_id=run["run_id"])`. Unlike
    `log`, this needs the server now: an outage or a refusal raises `MHPOClientError`.
    """
    base = (server or os.environ.get("MHPO_SERVER") or DEFAULT_SERVER).rstrip("/")
    token = token or os.environ.get("MHPO_TOKEN") or None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: dict[str, Any] = {"step": step} if name is None else {"step": step, "name": name}
    try:
        response = httpx.post(f"{base}/api/v1/runs/{run_id}/fork", json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise MHPOClientError(f"server {base} unreachable, run {run_id} not forked: {exc}") from exc
    if response.status_code != 201:
        raise MHPOClientError(f"server {base} refused to fork run {run_id} at step {step} ({_reason(response)})")
    return dict(response.json())


_live_runs: set[Run] = set()  # strong references: a run dropped without finish() is still flushed at exit
_hooks_installed = False
_uncaught_exception = False


def _install_exit_hooks() -> None:
    """At exit, finish runs the program left open: "failed" after an uncaught exception, else "finished"."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    previous = sys.excepthook

    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        global _uncaught_exception
        _uncaught_exception = True
        previous(exc_type, exc, tb)

    sys.excepthook = excepthook
    atexit.register(_finish_open_runs)


def _finish_open_runs() -> None:
    timeout = _env_float("MHPO_EXIT_TIMEOUT", DEFAULT_EXIT_TIMEOUT)
    status = "failed" if _uncaught_exception else "finished"
    for run in list(_live_runs):
        run.finish(status, timeout=timeout)
