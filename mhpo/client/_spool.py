"""The on-disk spool: batches the server has not acknowledged yet, one file per batch.

Layout, under the spool root (`spool_dir`, `MHPO_SPOOL_DIR`, or the user cache dir)::

    <root>/<server key>/<run id>/.lock          held (flock) by the process that owns the run
    <root>/<server key>/<run id>/run.json       creation request, until the server has the run
    <root>/<server key>/<run id>/status.json    final status, until the server has it
    <root>/<server key>/<run id>/<ns>-<batch id>-n<records>.json   one C1 batch body each
    <root>/<server key>/<run id>/<ns>-<id>-rewind.json   a rewind request ({"step": N}), replayed in turn
    <root>/rejected/<run id>/...                batches the server refused with a 4xx, and the
                                                items it refused one by one (with a .reason.txt)

The server key is a hash of the server URL, so any client pointed at that server can
replay what an earlier process left behind. Every file is written to a temporary name,
fsynced and renamed, so a crash leaves either the whole batch or nothing. The spool is
bounded by `max_bytes` (all servers together); a batch that does not fit is dropped with a
warning and counted, never raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("mhpo.client")

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no replay of other processes' spools
    fcntl = None  # type: ignore[assignment]

BATCH_RE = re.compile(r"^(?P<ns>\d{20})-(?P<batch_id>[0-9a-f-]{36})-(?:n(?P<n>\d+)|(?P<rewind>rewind))\.json$")
RUN_META = "run.json"
STATUS_META = "status.json"
LOCK = ".lock"
REJECTED = "rejected"


def server_key(server: str) -> str:
    """Directory name of one server's spool: stable across processes, safe on any filesystem."""
    return hashlib.sha256(server.rstrip("/").encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SpooledBatch:
    """One spooled request: a batch (its path, batch id and number of records, read from the name)
    or, with `rewind` set, a rewind of the run (no records), kept in order with the batches."""

    path: Path
    batch_id: str
    records: int
    rewind: bool = False


class RunLock:
    """An exclusive, non-blocking flock on a run's spool directory; released on close or process death."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Spool:
    """Per-server spool directory of batch files; thread-safe for distinct runs."""

    def __init__(self, root: Path, server: str, max_bytes: int) -> None:
        self.root = root
        self.server_dir = root / server_key(server)
        self.max_bytes = max_bytes
        self._used = self._scan_used()
        self._scanned_at = time.monotonic()
        self._full_warned_at = -float("inf")

    def _scan_used(self) -> int:
        total = 0
        if self.root.exists():
            for dirpath, _, files in os.walk(self.root):
                for name in files:
                    try:
                        total += os.stat(os.path.join(dirpath, name)).st_size
                    except OSError:
                        continue
        return total

    def run_dir(self, run_id: str) -> Path:
        return self.server_dir / run_id

    def lock(self, run_id: str) -> RunLock | None:
        """Take the run's lock, creating its directory; None if a live process holds it."""
        run_dir = self.run_dir(run_id)
        for _ in range(3):  # another process may remove an emptied directory under us: then start over
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                continue
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    return None
                try:
                    if os.stat(run_dir / LOCK).st_ino != os.fstat(fd).st_ino:
                        raise FileNotFoundError
                except FileNotFoundError:
                    os.close(fd)
                    continue
            for stale in run_dir.glob(".tmp-*"):  # a write cut short by a crash: never renamed, never valid
                stale.unlink(missing_ok=True)
            return RunLock(fd)
        return None

    def other_runs(self, run_id: str) -> list[str]:
        """Run ids with a spool directory under this server, other than `run_id`."""
        if fcntl is None or not self.server_dir.exists():
            return []
        return sorted(p.name for p in self.server_dir.iterdir() if p.is_dir() and p.name != run_id)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _fits(self, size: int) -> bool:
        if self._used + size <= self.max_bytes:
            return True
        now = time.monotonic()
        if now - self._scanned_at > 5.0:  # other processes may have replayed or written meanwhile
            self._scanned_at = now
            self._used = self._scan_used()
        return self._used + size <= self.max_bytes

    def write_batch(self, run_id: str, batch_id: str, n_records: int, body: bytes) -> bool:
        """Spool one batch; False (after a warning) if the spool is full or the disk refuses it."""
        if not self._fits(len(body)):
            now = time.monotonic()
            if now - self._full_warned_at > 30.0:
                self._full_warned_at = now
                logger.warning(
                    "mhpo spool full: %d of %d bytes used under %s; dropping batch of %d records for run %s. "
                    "Free space there, bring the server back, or raise spool_max_bytes / MHPO_SPOOL_MAX_BYTES.",
                    self._used,
                    self.max_bytes,
                    self.root,
                    n_records,
                    run_id,
                )
            return False
        run_dir = self.run_dir(run_id)
        path = run_dir / f"{time.time_ns():020d}-{batch_id}-n{n_records}.json"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._write_atomic(path, body)
        except OSError as exc:
            logger.warning(
                "mhpo spool write failed at %s (%s); dropping batch of %d records for run %s. "
                "Check that spool_dir / MHPO_SPOOL_DIR is writable and has space.",
                path,
                exc,
                n_records,
                run_id,
            )
            return False
        self._used += len(body)
        return True

    def write_rewind(self, run_id: str, step: int) -> bool:
        """Spool a rewind of the run behind its spooled batches; False (after a warning) if the disk refuses it."""
        run_dir = self.run_dir(run_id)
        body = json.dumps({"step": step}).encode()
        path = run_dir / f"{time.time_ns():020d}-{uuid.uuid4()}-rewind.json"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._write_atomic(path, body)
        except OSError as exc:
            logger.warning(
                "mhpo spool could not keep the rewind of run %s to step %d at %s: %s", run_id, step, path, exc
            )
            return False
        self._used += len(body)
        return True

    def batches(self, run_id: str) -> list[SpooledBatch]:
        """The run's spooled batches, oldest first."""
        run_dir = self.run_dir(run_id)
        if not run_dir.exists():
            return []
        found = []
        for path in run_dir.iterdir():
            match = BATCH_RE.match(path.name)
            if match:
                rewind = match["rewind"] is not None
                found.append(SpooledBatch(path, match["batch_id"], 0 if rewind else int(match["n"]), rewind))
        return sorted(found, key=lambda b: b.path.name)

    def remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self._used = max(0, self._used - size)

    def write_meta(self, run_id: str, name: str, payload: dict[str, Any]) -> None:
        """Keep a request (run creation, final status) for a later replay; best effort."""
        run_dir = self.run_dir(run_id)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._write_atomic(run_dir / name, json.dumps(payload).encode())
        except OSError as exc:
            logger.warning("mhpo spool could not keep %s for run %s at %s: %s", name, run_id, run_dir, exc)

    def read_meta(self, run_id: str, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.run_dir(run_id) / name).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("mhpo spool: ignoring unreadable %s of run %s: %s", name, run_id, exc)
            return None
        return data if isinstance(data, dict) else None

    def remove_meta(self, run_id: str, name: str) -> None:
        (self.run_dir(run_id) / name).unlink(missing_ok=True)

    def reject(self, run_id: str, batch: SpooledBatch, reason: str) -> Path:
        """Move a batch the server refused (4xx) aside with the reason, so it is kept but not retried."""
        target_dir = self.root / REJECTED / run_id
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / batch.path.name
        os.replace(batch.path, target)
        (target_dir / f"{batch.path.stem}.reason.txt").write_text(reason)
        return target

    def reject_body(self, run_id: str, batch_id: str, n_records: int, body: bytes, reason: str) -> Path | None:
        """Keep a refused batch that was never spooled in the rejected directory."""
        target_dir = self.root / REJECTED / run_id
        name = f"{time.time_ns():020d}-{batch_id}-n{n_records}.json"
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            self._write_atomic(target_dir / name, body)
            (target_dir / f"{name[:-5]}.reason.txt").write_text(reason)
        except OSError as exc:
            logger.warning("mhpo could not keep the refused batch %s at %s: %s", batch_id, target_dir, exc)
            return None
        return target_dir / name

    def remove_run_dir_if_empty(self, run_id: str) -> None:
        """Drop a run's directory once nothing but its lock file is left."""
        run_dir = self.run_dir(run_id)
        try:
            leftovers = [p.name for p in run_dir.iterdir() if p.name != LOCK and not p.name.startswith(".tmp-")]
        except FileNotFoundError:
            return
        if not leftovers:
            shutil.rmtree(run_dir, ignore_errors=True)
