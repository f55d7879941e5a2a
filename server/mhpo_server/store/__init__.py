"""Storage: the `Store` interface and its SQL implementation, chosen by URL."""

from mhpo_server.store.base import (
    DATA_ERROR,
    Conflict,
    Invalid,
    NotFound,
    OverLimit,
    Prejudged,
    SchemaError,
    Stale,
    StorageFull,
    Store,
    StoreError,
    Unavailable,
    WriteHealth,
    WriteResult,
)
from mhpo_server.store.sql import SqlStore, make_engine, storage_fault


def open_store(url: str, busy_timeout_ms: int = 30_000, pool_size: int = 10) -> Store:
    """The store for a SQLAlchemy URL (sqlite:/// or postgresql+psycopg://)."""
    return SqlStore.from_url(url, busy_timeout_ms=busy_timeout_ms, pool_size=pool_size)


__all__ = [
    "DATA_ERROR",
    "Conflict",
    "Invalid",
    "NotFound",
    "OverLimit",
    "Prejudged",
    "SchemaError",
    "SqlStore",
    "Stale",
    "StorageFull",
    "Store",
    "StoreError",
    "Unavailable",
    "WriteHealth",
    "WriteResult",
    "make_engine",
    "open_store",
    "storage_fault",
]
