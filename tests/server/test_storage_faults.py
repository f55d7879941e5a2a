"""Storage faults against a real server: a read-only SQLite file, a full disk, PostgreSQL going away.

Each answers 503 (507 for the full disk) with a JSON reason and Retry-After, `/healthz`
reports the failing writes, and the server works again once the fault is gone, without a
restart. The tests run as root, for whom a chmod'ed file is still writable, so the
read-only file is made immutable (`chattr +i`), the full disk is a small tmpfs, and the
database outage is a TCP proxy in front of PostgreSQL that the test stops and restarts.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import make_url

from tests.conftest import fresh_pg_database
from tests.fixtures.server import LiveServer, free_port

BIG_BINS = 8_000  # a histogram row of about 64 KB, to fill a small disk quickly


def run_body(name: str) -> dict[str, str]:
    return {"project": "p", "name": name}


# Words of driver texts (SQLite's and psycopg's) that no caller may read: they name the database.
DRIVER_WORDS = ("127.0.0.1", "port", "mhpo_test", "mhpo.db", "sqlite", "psycopg", "connection to server", "readonly")


def assert_fault(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert not [w for w in DRIVER_WORDS if w in response.text.lower()], response.text
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    assert body["reason"] == reason and body["detail"] and body["retry_after"] == int(response.headers["retry-after"])


def health(server: LiveServer) -> dict:
    response = httpx.get(f"{server.url}/healthz")
    assert response.status_code == 200
    return response.json()


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def immutable_file(tmp_path: Path) -> Iterator[Path]:
    """A migrated SQLite database (WAL mode) whose main file the test can make immutable."""
    db = tmp_path / "mhpo.db"
    import mhpo_migrations

    mhpo_migrations.upgrade(f"sqlite:///{db}")
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    probe = _run("chattr", "+i", str(db))
    if probe.returncode != 0:
        pytest.skip(f"chattr +i is not permitted here: {probe.stderr.strip()}")
    try:
        yield db
    finally:
        _run("chattr", "-i", str(db))


def test_read_only_sqlite_answers_503_and_recovers_without_restart(immutable_file: Path) -> None:
    with LiveServer(f"sqlite:///{immutable_file}") as server:
        refused = httpx.post(f"{server.url}/api/v1/runs", json=run_body("r"))
        assert_fault(refused, 503, "read_only")
        state = health(server)
        assert state["status"] == "degraded" and state["writes"]["last_failure"]["reason"] == "read_only"
        assert httpx.get(f"{server.url}/api/v1/runs").json() == {"runs": []}  # reads still answer

        assert _run("chattr", "-i", str(immutable_file)).returncode == 0
        created = httpx.post(f"{server.url}/api/v1/runs", json=run_body("r"))
        assert created.status_code == 201, created.text
        assert health(server)["status"] == "ok"
        assert [r["name"] for r in httpx.get(f"{server.url}/api/v1/runs").json()["runs"]] == ["r"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = _run("mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount))
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        _run("umount", "-l", str(mount))


def test_full_disk_answers_507_and_recovers_when_space_is_freed(small_disk: Path) -> None:
    with LiveServer(f"sqlite:///{small_disk / 'mhpo.db'}") as server:
        run_id = httpx.post(f"{server.url}/api/v1/runs", json=run_body("r")).json()["run_id"]
        records = f"{server.url}/api/v1/runs/{run_id}/records"
        full = None
        for i in range(40):
            batch = {
                "batch_id": f"b{i}",
                "records": [
                    {"step": 10 * i + j, "histograms": {"h": {"lo": 0.0, "hi": 1.0, "counts": [j + 1] * BIG_BINS}}}
                    for j in range(10)
                ],
            }
            response = httpx.post(records, json=batch, timeout=60)
            if response.status_code != 200:
                full = (batch, response)
                break
        assert full is not None, "the 3 MiB disk never filled up"
        batch, response = full
        assert_fault(response, 507, "disk_full")
        assert health(server)["writes"]["last_failure"]["reason"] == "disk_full"

        assert _run("mount", "-o", "remount,size=64m", str(small_disk)).returncode == 0
        retried = httpx.post(records, json=batch, timeout=60)
        assert retried.json() == {
            "accepted": 10,
            "duplicates": 0,
            "rejected": [],
        }  # the refused batch had left nothing behind
        assert health(server)["status"] == "ok"


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `stop()` closes the port and every connection, as a database outage."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.mark.postgres
def test_postgres_outage_answers_503_and_recovers_without_restart() -> None:
    with fresh_pg_database() as url:
        parsed = make_url(url)
        proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
        proxy.start()
        try:
            with LiveServer(
                parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
            ) as server:
                assert httpx.post(f"{server.url}/api/v1/runs", json=run_body("before")).status_code == 201
                proxy.stop()
                assert_fault(
                    httpx.post(f"{server.url}/api/v1/runs", json=run_body("during"), timeout=60), 503, "unreachable"
                )
                assert_fault(httpx.get(f"{server.url}/api/v1/runs", timeout=60), 503, "unreachable")
                state = health(server)
                assert state["status"] == "degraded" and state["database"]["ok"] is False

                proxy.start()
                assert httpx.post(f"{server.url}/api/v1/runs", json=run_body("after")).status_code == 201
                names = [r["name"] for r in httpx.get(f"{server.url}/api/v1/runs").json()["runs"]]
                assert sorted(names) == ["after", "before"]
                assert health(server)["status"] == "ok"
        finally:
            proxy.stop()


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        ("DiskFull", 507, "disk_full"),
        ("ReadOnlySqlTransaction", 503, "read_only"),
        ("AdminShutdown", 503, "storage_error"),
        ("TooManyConnections", 503, "storage_error"),
        ("SerializationFailure", 503, "busy"),
        ("DeadlockDetected", 503, "busy"),
    ],
)
def test_postgres_faults_that_cannot_be_caused_here_are_classified(error: str, status: int, reason: str) -> None:
    """The SQLSTATEs of PostgreSQL faults this machine cannot cause for real (its disk, its shutdown)."""
    import psycopg.errors
    from sqlalchemy.exc import DBAPIError

    from mhpo_server.store import StorageFull, storage_fault

    wrapped = DBAPIError.instance(
        "INSERT ...", {}, getattr(psycopg.errors, error)("the server said so"), psycopg.errors.Error
    )
    fault = storage_fault(wrapped)
    assert fault is not None and fault.reason == reason
    assert (507 if isinstance(fault, StorageFull) else 503) == status
    assert (
        storage_fault(DBAPIError.instance("SELECT", {}, psycopg.errors.UndefinedTable("no"), psycopg.errors.Error))
        is None
    )
