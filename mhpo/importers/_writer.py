"""Send imported runs to the service through the API every trainer uses, batch by batch.

Imported points take the one ingest path (`POST /api/v1/runs/{id}/records`: validate, take the
run's turn, write, evaluate flags and alert rules), so a past run gets the flags it would have
got live. Re-running an import stores nothing twice and an interrupted one resumes, because
everything it sends is named after its source:

- the run id is a UUID5 of (project, name, source tag), and the tag is kept in the run's config
  under "mhpo.import", so the run is found again and appended to, never duplicated;
- a batch id is a hash of (source, run, chunk index, its steps), and chunks are cut from the
  sorted history by a fixed size, so an already accepted batch is answered as a duplicate.

Each batch waits for its answer before the next goes out (an import must know what is stored);
busy answers (408, 429, 5xx) and lost connections are retried with back-off, any other refusal
stops the import with the server's reason.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from mhpo.client._sender import Outcome, classify
from mhpo.importers._model import SourceRun

NAMESPACE = uuid.UUID("6f1d2b3e-8c1a-5d0e-9b7f-4a2c1e0d9b31")
IMPORT_TAG = "mhpo.import"
BATCH_ITEMS = 20_000  # points per request: large batches keep the per-request cost small
BATCH_RECORDS = 5_000
RETRIES = 6


class ImportFailed(RuntimeError):
    """The server refused or could not be reached; what was accepted stays, a re-run resumes."""


@dataclass
class RunResult:
    run_id: str
    project: str
    name: str
    points: int
    accepted: int = 0
    duplicates: int = 0
    flags: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


def run_id_for(run: SourceRun) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{run.project}\n{run.name}\n{run.source}"))


def items(records: list[dict[str, Any]]) -> int:
    """Stored items of C1 records: one per scalar and per histogram."""
    return sum(len(r.get("scalars", ())) + len(r.get("histograms", ())) for r in records)


def chunks(records: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """The records cut into batches of about BATCH_ITEMS items; the same history always gives the same cuts."""
    batch: list[dict[str, Any]] = []
    size = 0
    for record in records:
        batch.append(record)
        size += len(record.get("scalars", ())) + len(record.get("histograms", ()))
        if size >= BATCH_ITEMS or len(batch) >= BATCH_RECORDS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def batch_id(source: str, run_id: str, index: int, batch: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256(f"{source}\n{run_id}\n{index}\n{batch[0]['step']}-{batch[-1]['step']}".encode())
    return f"import-{digest.hexdigest()[:48]}"


class Writer:
    """Posts SourceRuns to one server; `progress(n)` is called with the points of each accepted batch."""

    def __init__(self, server: str, token: str | None = None, timeout_s: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server.rstrip("/")
        self.client = httpx.Client(base_url=self.server, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.client.close()

    def write(self, run: SourceRun, progress: Callable[[int], object] = lambda n: None) -> RunResult:
        run_id = run_id_for(run)
        config = {**run.config, IMPORT_TAG: {"source": run.source, "format": run.format}}
        body = {"project": run.project, "name": run.name, "config": config, "run_id": run_id}
        self._send("POST", "/api/v1/runs", body, f"creating run {run.project}/{run.name}")
        result = RunResult(run_id, run.project, run.name, run.points, notes=list(run.notes))
        for index, batch in enumerate(chunks(run.records)):
            answer = self._send(
                "POST",
                f"/api/v1/runs/{run_id}/records",
                {"batch_id": batch_id(run.source, run_id, index, batch), "records": batch},
                f"run {run.project}/{run.name}, steps {batch[0]['step']}-{batch[-1]['step']}",
            )
            if answer.get("rejected"):
                refused = answer["rejected"][0]
                raise ImportFailed(
                    f"the server refused {len(answer['rejected'])} items of run {run.project}/{run.name} (first: "
                    f"step {refused['step']} {refused['field']} {refused['key']!r}: {refused['reason']}); "
                    "fix them in the source and import again"
                )
            result.accepted += answer["accepted"]
            result.duplicates += answer["duplicates"]
            progress(items(batch))
        self._send("PATCH", f"/api/v1/runs/{run_id}", {"status": run.status}, f"closing run {run.project}/{run.name}")
        events = self._send("GET", f"/api/v1/runs/{run_id}/events", None, "reading the run's flags")["events"]
        result.flags = Counter(e["kind"] for e in events if e.get("severity") in ("warning", "critical"))
        return result

    def _send(self, method: str, path: str, body: Any, what: str) -> Any:
        content = None if body is None else json.dumps(body, allow_nan=True, separators=(",", ":"))
        delay = 0.5
        for attempt in range(RETRIES + 1):
            try:
                response = self.client.request(
                    method, path, content=content, headers={"Content-Type": "application/json"} if content else None
                )
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                outcome = classify(response.status_code)
                if outcome is Outcome.OK:
                    return response.json()
                if outcome is not Outcome.RETRY:  # the client's rule: 408, 429 and 5xx are worth a retry
                    raise ImportFailed(
                        f"{self.server} refused {what}: {response.status_code} {response.text[:500]}"
                        + (
                            " (pass a write token with --token or MHPO_TOKEN)"
                            if response.status_code in (401, 403)
                            else ""
                        )
                    )
                problem = f"{response.status_code} {response.text[:200]}"
            if attempt < RETRIES:
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise ImportFailed(
            f"{self.server} did not take {what} after {RETRIES + 1} tries ({problem}); what it accepted is kept: "
            "run the same import again to resume"
        )
