"""Tables of revision 0002: alert rules, fired alerts, per-project detector parameters.

They live on the store's declarative `Base`, so Alembic sees one metadata for the whole
schema; `migrations/versions/0002_alerts.py` must match them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Boolean, Double, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from mhpo_server.store.models import NAME_LENGTH, Base, JSONText


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
