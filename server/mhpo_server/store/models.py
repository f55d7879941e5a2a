"""SQLAlchemy 2 table definitions; the Alembic migrations in `migrations/versions/` must match them.

Data tables (`scalars`, `histograms`, `outliers`) are keyed by (run, key, step) and carry no
foreign key: the store checks the run once per batch, and a per-row key check would cost
ingest speed for nothing. NaN is stored explicitly (`is_nan`, value NULL) because SQLite
turns a NaN REAL into NULL; +-Infinity are stored as values (both databases keep them).
JSON payloads are text written by Python's json module so that NaN/Infinity survive.
A histogram's bins are packed binary (little-endian int64 `[underflow, overflow, *counts]`,
float64 `[min, max, sum, sumsq]`, NaN included) so that reading 100,000 steps is one
`numpy.frombuffer`, not 100,000 JSON parses.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
KEY_LENGTH = 250
NAME_LENGTH = 200


class JSONText(TypeDecorator[Any]):
    """JSON kept as text, so NaN and Infinity round-trip on PostgreSQL too (JSONB rejects them)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else json.dumps(value, allow_nan=True, separators=(",", ":"))

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Every row class maps one Table (SQLAlchemy types it as any FromClause): the store inserts into it.
    __table__: ClassVar[Table]


class ProjectRow(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    created_at: Mapped[float] = mapped_column(Double)


class RunRow(Base):
    __tablename__ = "runs"
    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    loss: Mapped[str | None] = mapped_column(String(NAME_LENGTH), nullable=True)
    config: Mapped[Any] = mapped_column(JSONText, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_seen_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    # The last step whose flags and alert rules are stored (None: none yet); behind `last_step`
    # only between a batch's commit and its evaluation, or after a crash in between.
    evaluated_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Changes to the run's history (batches stored, rewinds): a process's cached view of the run is
    # current when the count is the one it saw after its own last change.
    write_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    parent_run_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    fork_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ScalarRow(Base):
    __tablename__ = "scalars"
    __table_args__ = {"sqlite_with_rowid": False}
    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    value: Mapped[float | None] = mapped_column(Double, nullable=True)
    is_nan: Mapped[int] = mapped_column(SmallInteger)
    time: Mapped[float] = mapped_column(Double)


class HistogramRow(Base):
    __tablename__ = "histograms"
    __table_args__ = {"sqlite_with_rowid": False}
    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    lo: Mapped[float] = mapped_column(Double)
    hi: Mapped[float] = mapped_column(Double)
    bins: Mapped[int] = mapped_column(Integer)
    counts: Mapped[bytes] = mapped_column(LargeBinary)
    stats: Mapped[bytes] = mapped_column(LargeBinary)
    time: Mapped[float] = mapped_column(Double)


class OutlierRow(Base):
    __tablename__ = "outliers"
    __table_args__ = {"sqlite_with_rowid": False}
    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    data: Mapped[Any] = mapped_column(JSONText)
    time: Mapped[float] = mapped_column(Double)


class BatchRow(Base):
    __tablename__ = "batches"
    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    items: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Double)


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(String(NAME_LENGTH))
    scope: Mapped[str] = mapped_column(String(8))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Double)


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("run_id", "kind", "detector", "step"), Index(None, "run_id", "step"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"))
    step: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    detector: Mapped[str] = mapped_column(String(NAME_LENGTH))
    message: Mapped[str] = mapped_column(Text)
    evidence: Mapped[Any] = mapped_column(JSONText, nullable=True)
    created_at: Mapped[float] = mapped_column(Double)


# Alert rules, fired alerts, per-project detector parameters (revision 0002).
class FlagParamsRow(Base):
    """A project's overrides of the detector parameters (a partial `FlagParams` dict)."""

    __tablename__ = "flag_params"
    project: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    params: Mapped[Any] = mapped_column(JSONText)
    updated_at: Mapped[float] = mapped_column(Double)


class AlertRuleRow(Base):
    __tablename__ = "alert_rules"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    project: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    run_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    condition: Mapped[Any] = mapped_column(JSONText)
    severity: Mapped[str] = mapped_column(String(16))
    cooldown_s: Mapped[float] = mapped_column(Double)
    channels: Mapped[Any] = mapped_column(JSONText)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)


class AlertRow(Base):
    """A fired alert; `rule_name` is copied so the history survives the rule's deletion."""

    __tablename__ = "alerts"
    # One alert per (rule, run, step) of the run's current history: a rewound alert stays for the
    # record and the same step may fire again on the new trajectory.
    __table_args__ = (
        Index(
            "uq_alerts_rule_id_run_id_step",
            "rule_id",
            "run_id",
            "step",
            unique=True,
            sqlite_where=text("rewound_at IS NULL"),
            postgresql_where=text("rewound_at IS NULL"),
        ),
        Index(None, "run_id", "step"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rule_id: Mapped[int | None] = mapped_column(ForeignKey("alert_rules.id", ondelete="SET NULL"), nullable=True)
    rule_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    project: Mapped[str] = mapped_column(String(NAME_LENGTH))
    run_id: Mapped[str] = mapped_column(String(36))
    step: Mapped[int] = mapped_column(BigInteger)
    severity: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    evidence: Mapped[Any] = mapped_column(JSONText, nullable=True)
    created_at: Mapped[float] = mapped_column(Double)
    acknowledged_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    delivery_status: Mapped[str] = mapped_column(String(16))
    delivery_attempts: Mapped[int] = mapped_column(Integer)
    delivery_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    rewound_at: Mapped[float | None] = mapped_column(Double, nullable=True)
