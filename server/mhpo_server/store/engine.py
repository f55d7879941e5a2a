"""The engine and the one transaction helper every part of the store runs on.

`make_engine` sets SQLite up (WAL, busy timeout, BEGIN IMMEDIATE for writes) or pools
PostgreSQL; `storage_fault` names the retryable fault a driver error stands for; a
`Database` holds the engine, its write health and the run turn that serialises one run's
writers across server processes. Every method of the store's parts runs in one
transaction (`Database.tx`), committed before the route answers: what a client saw
accepted survives a crash of the server process.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic.migration import MigrationContext
from filelock import FileLock, Timeout
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, IntegrityError

import mhpo_migrations
from mhpo_server.store.base import Conflict, SchemaError, StorageFull, Unavailable, WriteHealth

log = logging.getLogger(__name__)
IN_CHUNK = 500  # values per IN (...) list: far below SQLite's 32,766 and PostgreSQL's 65,535 bind parameters
NAN = math.nan
# SQLite result codes (by name prefix) after which a pooled connection is not to be trusted: a
# connection opened while the file was read-only stays read-only after the file is writable again.
SQLITE_RECONNECT = ("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_CORRUPT", "SQLITE_NOTADB")
RETRY_BUSY_S = 1
TURN_TIMEOUT_S = 60  # longest wait for a run's turn (another process ingesting the run) before a 503
TURN_STRIPES = 64  # lock files of a SQLite database's run turns
RETRY_FAULT_S = 5
RETRY_FULL_S = 60


def make_engine(url: str, busy_timeout_ms: int = 30_000, pool_size: int = 10) -> Engine:
    """An engine with SQLite in WAL mode and a busy timeout, or a pooled PostgreSQL engine."""
    if url.startswith("sqlite"):
        mhpo_migrations.sqlite_directory(url)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        _sqlite_pragmas(engine, busy_timeout_ms)
        event.listen(engine, "handle_error", _reconnect_after_fault)
        return engine
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    event.listen(engine, "handle_error", _reconnect_after_fault)
    return engine


def storage_fault(exc: BaseException) -> Unavailable | None:
    """The retryable storage fault a driver error stands for (busy, read-only, full, unreachable), or None.

    SQLite names its result codes (`sqlite_errorname`); PostgreSQL gives a SQLSTATE:
    class 08 (connection), 53 (insufficient resources, 53100 = disk full), 57P (shutting
    down), 25006 (read-only transaction), 40001/40P01 (serialization failure, deadlock).
    A connection that is gone without a SQLSTATE (refused, reset) is unavailable too.
    """
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    name = str(getattr(orig, "sqlite_errorname", "") or "")
    state = str(getattr(orig, "sqlstate", "") or "")
    detail = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if name.startswith("SQLITE_FULL") or state == "53100":
        return StorageFull(
            f"the disk holding the database is full ({detail}); free space, the write can then be retried",
            "disk_full",
            RETRY_FULL_S,
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or state in ("40001", "40P01", "55P03"):
        return Unavailable(f"database busy, retry later ({detail})", "busy", RETRY_BUSY_S)
    if name.startswith("SQLITE_READONLY") or state == "25006":
        return Unavailable(
            f"the database is read-only ({detail}); make it writable, no restart needed", "read_only", RETRY_FAULT_S
        )
    if name.startswith(SQLITE_RECONNECT) or state.startswith(("53", "57P", "08")):
        return Unavailable(f"the database cannot be used right now ({detail})", "storage_error", RETRY_FAULT_S)
    if exc.connection_invalidated or (
        not state and type(orig).__name__ in ("OperationalError", "InterfaceError") and not name
    ):
        return Unavailable(f"the database is unreachable ({detail})", "unreachable", RETRY_FAULT_S)
    return None


def _reconnect_after_fault(context: ExceptionContext) -> None:
    """Treat read-only, I/O and can't-open errors as a lost connection, so the pool reconnects.

    SQLAlchemy then drops every pooled connection; the next request opens fresh ones,
    which see the file as it is now (writable again, space freed) without a restart.
    """
    name = str(getattr(context.original_exception, "sqlite_errorname", "") or "")
    if name.startswith(SQLITE_RECONNECT):
        context.is_disconnect = True


def _sqlite_pragmas(engine: Engine, busy_timeout_ms: int) -> None:
    """WAL (readers never block the writer), busy timeout, BEGIN IMMEDIATE for writes, a bigger cache.

    A deferred transaction that reads and then writes can fail at once with "database is
    locked" instead of waiting; taking the write lock up front makes writers queue on the
    busy timeout. synchronous=NORMAL in WAL mode loses nothing when the process dies
    (only an operating-system crash can drop the last commits). A 16 MiB page cache per
    connection and memory-mapped reads make scanning a long series for downsampling cheaper.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA cache_size=-16384")
        cursor.execute("PRAGMA mmap_size=268435456")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        write = connection.get_execution_options().get("mhpo_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def chunks(values: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


def as_float(value: float | None) -> float:
    return NAN if value is None else float(value)


class Database:
    """The engine the store's parts share: its transactions, its write health, the run turns."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.write_health = WriteHealth()
        self.dialect = engine.dialect.name
        self.insert: Callable[..., Any] = sqlite.insert if self.dialect == "sqlite" else postgresql.insert
        # Connections that hold a run's turn (a session advisory lock) while the request uses
        # the main pool: a pool of their own, so waiting turns never starve the writes.
        self._turns = (
            create_engine(
                engine.url,
                pool_size=4,
                max_overflow=60,
                pool_pre_ping=True,
                connect_args={"options": f"-c lock_timeout={TURN_TIMEOUT_S * 1000}"},
            )
            if self.dialect == "postgresql"
            else None
        )
        # A SQLite file's turns: striped lock files beside it (an in-memory database has one process).
        database = engine.url.database
        self._turn_files = (
            Path(f"{database}-turns") if self.dialect == "sqlite" and database and database != ":memory:" else None
        )

    def close(self) -> None:
        self.engine.dispose()
        if self._turns is not None:
            self._turns.dispose()

    def run_turn(self, run_id: str) -> AbstractContextManager[None]:
        """PostgreSQL: a session advisory lock on the run (`pg_advisory_lock`); SQLite: an OS file
        lock (`filelock`) on one of `TURN_STRIPES` files beside the database, by run id.

        A turn not granted within `TURN_TIMEOUT_S` is a 503 (busy, retry); a dropped
        connection or an exited process releases it.
        """
        if self._turns is not None:
            return self._advisory_turn(self._turns, uuid.UUID(run_id).int >> 65)  # 63 bits: a non-negative bigint
        if self._turn_files is not None:
            return self._file_turn(self._turn_files, uuid.UUID(run_id).int % TURN_STRIPES)
        return nullcontext()

    @staticmethod
    @contextmanager
    def _advisory_turn(turns: Engine, key: int) -> Iterator[None]:
        try:
            conn = turns.connect()
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        except DBAPIError as exc:
            raise storage_fault(exc) or Unavailable(
                f"the run's turn could not be taken: {exc.orig}", "busy", RETRY_BUSY_S
            ) from exc
        try:
            yield
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
            except DBAPIError:
                conn.invalidate()  # closing the session releases the lock
            finally:
                conn.close()

    @staticmethod
    @contextmanager
    def _file_turn(directory: Path, stripe: int) -> Iterator[None]:
        lock = FileLock(directory / f"{stripe}.lock")
        try:
            directory.mkdir(exist_ok=True)
            lock.acquire(timeout=TURN_TIMEOUT_S)
        except Timeout as exc:
            raise Unavailable(
                f"another server process held the run for {TURN_TIMEOUT_S} s", "busy", RETRY_BUSY_S
            ) from exc
        except OSError as exc:
            raise Unavailable(
                f"the run's lock file beside the database cannot be written ({exc}); make "
                f"{directory} writable, no restart needed",
                "read_only",
                RETRY_FAULT_S,
            ) from exc
        try:
            yield
        finally:
            lock.release()

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except DBAPIError as exc:
            raise storage_fault(exc) or Unavailable(
                f"the database failed a trivial query: {exc.orig}", "storage_error", RETRY_FAULT_S
            ) from exc

    @contextmanager
    def tx(self, write: bool = False) -> Iterator[Connection]:
        """One transaction: commit on success, roll back on any error, translate driver errors.

        Storage faults become `Unavailable` (503) or `StorageFull` (507); a write's outcome
        is recorded in `write_health` for `/healthz`. While writes are failing, each write
        opens a fresh connection, and the first one that succeeds drops the pool: a SQLite
        connection opened while the file was read-only stays read-only for good.
        """
        recovering = write and self.write_health.failing
        try:
            with self.engine.connect() as conn:
                if recovering:
                    conn.invalidate()  # the next statement gets a new connection, which sees the file as it is now
                if write:
                    conn.execution_options(mhpo_write=True)
                with conn.begin():
                    yield conn
        except IntegrityError as exc:
            log.warning("integrity error: %s", exc.orig)
            raise Conflict("the write conflicts with stored data (an id or key already taken)") from exc
        except DBAPIError as exc:
            fault = storage_fault(exc)
            if fault is None:
                raise
            if write:
                self.write_health.failed(fault)
            raise fault from exc
        if recovering:
            self.engine.dispose(close=False)  # connections opened during the fault are not reused
        if write:
            self.write_health.ok()

    @contextmanager
    def plain_tx(self) -> Iterator[Connection]:
        """One transaction, driver errors as they are and no write health: the monitoring paths
        (flag and alert evaluation, rules, webhooks) report their own failures."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def check_schema(self) -> None:
        url = self.engine.url.render_as_string(hide_password=True)
        fix = f"run `mhpo db upgrade --db {url}`"
        head = mhpo_migrations.head()
        with self.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        if current is None:
            raise SchemaError(f"database {url} has no mhpo schema (not migrated): {fix}")
        if current != head:
            if current not in mhpo_migrations.known_revisions():
                raise SchemaError(
                    f"database {url} is at revision {current}, newer than this server knows (head {head}): "
                    "upgrade the mhpo package"
                )
            raise SchemaError(f"database {url} is at revision {current}, behind the server's {head}: {fix}")


class Part:
    """One aggregate of the store (runs, records, series, events, alerts, tokens) over the shared `Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.dialect = db.dialect
        self._insert = db.insert
        self._tx = db.tx


def dumps(value: Any) -> str:
    """JSON as the store writes it: compact, NaN and Infinity kept."""
    return json.dumps(value, allow_nan=True, separators=(",", ":"))
