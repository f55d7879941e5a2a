"""Wiring of flags and alerts into the app: `install(app)` is the one call `create_app` makes.

It gives the ingest service its evaluator (flags and alert rules), the fired alerts as a source of `GET /api/v1/runs/{id}/events`
(with `"type": "alert"`), the alert routes, the flag kinds and entropy forecast routes, and the webhook
worker (started on the first delivery, stopped with the app). Webhook settings come from `MHPO_WEBHOOK_*` variables.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mhpo_server.monitoring.listener import IngestMonitor
from mhpo_server.monitoring.targets import DEFAULT_MAX_URL_LENGTH, TargetPolicy
from mhpo_server.monitoring.webhook import WebhookDispatcher, WebhookMetrics
from mhpo_server.routes import alerts as alert_routes
from mhpo_server.routes import monitoring as monitoring_routes
from mhpo_server.routes.events import EventSource
from mhpo_server.store import AlertStore, Store


class WebhookSettings(BaseSettings):
    """Webhook delivery: `MHPO_WEBHOOK_TIMEOUT_S`, `MHPO_WEBHOOK_ALLOW_CIDRS`, ..."""

    model_config = SettingsConfigDict(env_prefix="MHPO_WEBHOOK_", extra="ignore")

    timeout_s: float = Field(
        5.0, gt=0, le=300, description="total deadline of one attempt: name lookup, connect, send, reply headers"
    )
    max_attempts: int = Field(4, ge=1, description="attempts in all before the delivery is marked failed")
    backoff_s: float = Field(1.0, ge=0, description="wait before the first retry; doubles after each failure")
    public_url: str | None = Field(None, description="dashboard URL linked from the message, e.g. http://host:8765")
    workers: int = Field(4, ge=1, le=64, description="deliveries sent at the same time")
    queue_size: int = Field(
        1000, ge=1, description="deliveries waiting (retries included); beyond it one fails at once"
    )
    read_limit_bytes: int = Field(
        8192, ge=1024, le=65536, description="most bytes read from a reply (status and headers)"
    )
    allow_hosts: str = Field(
        "", description="comma-separated host names allowed even when they resolve to internal addresses"
    )
    allow_cidrs: str = Field(
        "", description="comma-separated address ranges allowed as targets, e.g. 10.0.5.0/24,127.0.0.1/32"
    )
    max_url_length: int = Field(
        DEFAULT_MAX_URL_LENGTH, ge=64, le=65536, description="longest webhook URL a rule may save; longer gets 422"
    )
    ca_bundle: str | None = Field(
        None, description="PEM file of the CAs that sign HTTPS receivers' certificates (default: certifi's public CAs)"
    )

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, value: str | None) -> str | None:
        if value:
            try:
                ssl.create_default_context(cafile=value)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"MHPO_WEBHOOK_CA_BUNDLE={value!r} is not a readable PEM file of CA certificates "
                    f"({exc}); give the path of one, or unset it for the public CAs"
                ) from exc
        return value or None

    @field_validator("allow_cidrs")
    @classmethod
    def _cidrs(cls, value: str) -> str:
        try:
            TargetPolicy.from_settings([], value.split(","))
        except ValueError as exc:
            raise ValueError(f"MHPO_WEBHOOK_ALLOW_CIDRS={value!r}: {exc}; give ranges like 10.0.5.0/24") from exc
        return value

    def policy(self) -> TargetPolicy:
        return TargetPolicy.from_settings(
            self.allow_hosts.split(","), self.allow_cidrs.split(","), self.timeout_s, self.max_url_length
        )


def alert_events(alerts: AlertStore) -> EventSource:
    """The event source: a run's fired alerts in the shape of its flags, plus the alert fields."""

    def read(_store: Store, run_id: str, after_id: int | None, since: float | None) -> list[dict[str, Any]]:
        return [
            {**a.model_dump(), "kind": "alert", "detector": "alert_rule"}
            for a in alerts.list_alerts(run_id=run_id, limit=100_000, after_id=after_id, since=since)
        ]

    return EventSource("alert", read)


def install(app: FastAPI, webhook_settings: WebhookSettings | None = None) -> IngestMonitor:
    cfg = webhook_settings or WebhookSettings()
    alerts = app.state.store.alerts
    policy = cfg.policy()
    dispatcher = WebhookDispatcher(
        alerts,
        cfg.timeout_s,
        cfg.max_attempts,
        cfg.backoff_s,
        cfg.public_url,
        policy,
        workers=cfg.workers,
        queue_size=cfg.queue_size,
        read_limit=cfg.read_limit_bytes,
        metrics=WebhookMetrics(app.state.metrics.registry),
        ca_bundle=cfg.ca_bundle,
    )
    monitor = IngestMonitor(alerts, dispatcher)
    app.state.alert_store = alerts
    app.state.webhooks = dispatcher
    app.state.webhook_policy = policy
    app.state.flag_monitor = monitor
    app.state.ingest.monitor = monitor
    app.state.event_sources.append(alert_events(alerts))
    app.include_router(alert_routes.router)
    app.include_router(monitoring_routes.router)
    dispatcher.resume_pending({r.id: str(r.webhook_url) for r in alerts.list_rules() if r.webhook_url is not None})

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            try:
                yield state
            finally:
                dispatcher.stop()

    app.router.lifespan_context = lifespan
    return monitor
