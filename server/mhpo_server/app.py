"""The FastAPI application factory (contract C5).

`create_app(settings)` opens the store, refuses a database that is not at the migrations'
head, and wires routers, error handlers and middleware. Extension points for other parts
of the product: `app.state.ingest.listeners` (called after each committed batch with
`(store, run_id, new_records)`), `app.state.event_sources` (`EventSource`s: extra items for
`GET .../events`), and plain `app.include_router` / `app.mount` for more routes or the
dashboard.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DataError, DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mhpo import __version__
from mhpo_server.config import Settings, data_dir
from mhpo_server.flags.service import install as install_flags
from mhpo_server.health import ListenerHealth
from mhpo_server.ingest import Ingest
from mhpo_server.limits import BodySizeLimitMiddleware
from mhpo_server.metrics import MetricsMiddleware, ServiceMetrics
from mhpo_server.responses import NaNJSONResponse
from mhpo_server.routes import auth, events, health, mlflow, projects, records, runs, series
from mhpo_server.routes.events import EventSource
from mhpo_server.schemas import ERROR_RESPONSES
from mhpo_server.store import (
    DATA_ERROR,
    Conflict,
    Invalid,
    NotFound,
    OverLimit,
    StorageFull,
    Store,
    Unavailable,
    open_store,
    storage_fault,
)

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting the server cannot start with; the message names the setting and the fix."""


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    settings = settings or Settings()
    owned = store is None
    if store is None:
        store = open_store(settings.db, busy_timeout_ms=settings.sqlite_busy_timeout_ms, pool_size=settings.pool_size)
    try:
        if owned:
            store.check_schema()
        public_token = _public_dashboard_token(settings, store)
        login_secret = _dashboard_secret(settings) if settings.dashboard and settings.auth else None
    except Exception:
        if owned:
            store.close()
        raise

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Runs a crash left behind their stored steps are evaluated while the server already answers.
        threading.Thread(target=app.state.ingest.catch_up, name="mhpo-catch-up", daemon=True).start()
        yield
        store.close()

    app = FastAPI(
        title="MHPO Monitor API",
        version=__version__,
        description="Ingest and query trust-region diagnostics of GRPO-family training runs.",
        default_response_class=NaNJSONResponse,
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    metrics = ServiceMetrics()
    app.state.settings = settings
    app.state.store = store
    app.state.metrics = metrics
    app.state.listener_health = ListenerHealth(metrics)
    app.state.ingest = Ingest(store, metrics, app.state.listener_health)
    event_sources: list[EventSource] = []
    app.state.event_sources = event_sources
    for module in (health, auth, projects, runs, records, series, events, mlflow):
        app.include_router(module.router)
    install_flags(app)
    _install_error_handlers(app)
    _schema_limits(app, settings)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.dashboard:
        from mhpo_dashboard.app import Login, mount_dashboard, self_url

        login = None
        if login_secret is not None:
            login = Login(
                secret=login_secret,
                max_age_s=settings.dashboard_session_hours * 3600,
                cookie_secure=settings.dashboard_cookie_secure,
            )
        mount_dashboard(
            app,
            self_url(settings.host, settings.port),
            token=public_token,
            login=login,
            max_compare_runs=settings.dashboard_max_compare_runs,
        )
    return app


def _public_dashboard_token(settings: Settings, store: Store) -> str | None:
    """The public dashboard's token, checked: one this server knows, and read scope (anyone will act with it)."""
    if settings.dashboard_public_token is None or not settings.auth or not settings.dashboard:
        return None
    token = settings.dashboard_public_token.get_secret_value()
    info = store.resolve_token(token)
    if info is None:
        raise ConfigError(
            "MHPO_DASHBOARD_PUBLIC_TOKEN is not a token of this server: create one with "
            "`mhpo token create --project P --scope read`, or unset it so viewers log in"
        )
    if info.scope != "read":
        raise ConfigError(
            f"MHPO_DASHBOARD_PUBLIC_TOKEN is a {info.scope!r} token of project {info.project!r}: "
            "everyone reaching the dashboard acts with it, so it must be a read token "
            "(`mhpo token create --project P --scope read`)"
        )
    return token


def _dashboard_secret(settings: Settings) -> bytes:
    """MHPO_DASHBOARD_SECRET, else the key generated once into the data directory."""
    from mhpo_dashboard.auth import load_or_create_secret

    if settings.dashboard_secret is not None:
        secret = settings.dashboard_secret.get_secret_value().encode()
        if len(secret) < 16:
            raise ConfigError(
                f"MHPO_DASHBOARD_SECRET has {len(secret)} characters: use at least 16 random ones "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`), or unset it"
            )
        return secret
    return load_or_create_secret(data_dir())


def _schema_limits(app: FastAPI, settings: Settings) -> None:
    """Make /openapi.json state what this server enforces from its settings.

    The `max_points`/`max_steps` maximum is `MHPO_MAX_POINTS`; with auth off no operation
    asks for a token (the bearer scheme is only listed when the server checks it).
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
                for parameter in operation.get("parameters", []):
                    if parameter.get("name") in ("max_points", "max_steps"):
                        parameter["schema"]["maximum"] = settings.max_points
                if not settings.auth:
                    operation.pop("security", None)
            if not settings.auth:
                schema.get("components", {}).pop("securitySchemes", None)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> NaNJSONResponse:
    return NaNJSONResponse({"detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure the caller can fix is a 4xx naming the field; a busy database is a 503 to retry."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> NaNJSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return _error(422, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> NaNJSONResponse:
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(NotFound)
    async def _not_found(_request: Request, exc: NotFound) -> NaNJSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(_request: Request, exc: Conflict) -> NaNJSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(Invalid)
    async def _invalid(_request: Request, exc: Invalid) -> NaNJSONResponse:
        return _error(422, [{"loc": ["body", *exc.loc], "msg": exc.message, "type": "value_error"}])

    @app.exception_handler(OverLimit)
    async def _over_limit(_request: Request, exc: OverLimit) -> NaNJSONResponse:
        return _error(422, [{"loc": list(exc.loc), "msg": exc.message, "type": "value_error"}])

    @app.exception_handler(DataError)
    async def _data(_request: Request, exc: DataError) -> NaNJSONResponse:
        # A value the schema let through but the database cannot hold (a NUL byte in a
        # PostgreSQL string): the caller's input, so a 4xx; the driver's text goes to the log only.
        log.warning("database refused a value: %s", exc.orig)
        return _error(422, DATA_ERROR)

    @app.exception_handler(Unavailable)
    async def _unavailable(_request: Request, exc: Unavailable) -> NaNJSONResponse:
        return _fault(exc)

    @app.exception_handler(DBAPIError)
    async def _driver(_request: Request, exc: DBAPIError) -> NaNJSONResponse:
        # Driver errors that escaped a store's own translation (the alert tables' store).
        fault = storage_fault(exc)
        if fault is None:
            raise exc
        return _fault(fault)


def _fault(exc: Unavailable) -> NaNJSONResponse:
    """503 (507 for a full disk) with a JSON reason and Retry-After, which clients retry or spool on.

    The body says what kind of fault it is, never the driver's text (host, port, database
    name): that goes to the server log.
    """
    log.error("storage fault (%s): %s", exc.reason, exc)
    return NaNJSONResponse(
        {"detail": exc.public_message, "reason": exc.reason, "retry_after": exc.retry_after},
        status_code=507 if isinstance(exc, StorageFull) else 503,
        headers={"Retry-After": str(exc.retry_after)},
    )
