"""Server settings: one pydantic-settings class, read from `MHPO_*` environment variables.

Routes reach it through `deps.SettingsDep`, so a test passes its own `Settings` to
`create_app` instead of patching the environment.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import platformdirs
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 8765
MIB = 1024 * 1024


def data_dir() -> Path:
    """The user's data directory (created on first use): the default database and the dashboard's secret."""
    path = Path(platformdirs.user_data_dir("mhpo"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_db_url() -> str:
    """A SQLite file in the user's data directory."""
    return f"sqlite:///{data_dir() / 'mhpo.db'}"


class Settings(BaseSettings):
    """Everything the service reads from its environment; each field is `MHPO_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="MHPO_", extra="ignore")

    db: str = Field(
        default_factory=default_db_url, description="SQLAlchemy URL (sqlite:///... or postgresql+psycopg://...)"
    )
    auth: bool = Field(
        False, description="require `Authorization: Bearer <token>` (write scope for writes, any for reads)"
    )
    host: str = Field("127.0.0.1", description="listen address of `mhpo serve`")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="listen port of `mhpo serve`")
    max_body_bytes: int = Field(32 * MIB, ge=1024, description="largest request body accepted; larger gets 413")
    max_records_per_batch: int = Field(10_000, ge=1, description="records in one POST .../records")
    max_points: int = Field(10_000, ge=10, description="upper bound of `max_points`/`max_steps` on reads")
    max_keys_per_read: int = Field(
        1_000, ge=1, description="keys in one scalars read (asked for, or the run's keys when none are named)"
    )
    max_points_per_read: int = Field(
        1_000_000, ge=100, description="keys x max_points of one scalars read: the most points it may return"
    )
    max_histogram_cells: int = Field(
        4_000_000, ge=1_000, description="stored rows x bins one histogram read may load (narrow it with start/end)"
    )
    max_history_rows: int = Field(
        25_000, ge=100, description="points per page of MLflow's get-history (MLflow's own page size)"
    )
    max_search_runs: int = Field(
        1_000, ge=1, description="runs per page of MLflow's runs/search (each with its latest metrics)"
    )
    max_config_value_bytes: int = Field(
        64 * 1024, ge=256, description="UTF-8 bytes of one string in a run's config, MLflow param or tag"
    )
    max_config_bytes: int = Field(
        256 * 1024, ge=1024, description="JSON bytes of a run's whole config (MLflow params and tags included)"
    )
    sqlite_busy_timeout_ms: int = Field(30_000, ge=0, description="how long a SQLite writer waits for the lock")
    pool_size: int = Field(10, ge=1, description="database connections kept open (as many again may overflow)")
    header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="a request's line and headers must arrive within this; else 408 and close"
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, le=600, description="an idle kept-alive connection is closed after this"
    )
    insecure_public: bool = Field(False, description="allow a non-loopback host with auth off")
    dashboard: bool = Field(True, description="serve the Dash dashboard at / beside the API (off for API-only use)")
    dashboard_public_token: SecretStr | None = Field(
        None,
        description="auth on: a read token that makes the dashboard public (no login; anyone reaching the port "
        "sees that token's project); unset: every viewer logs in with their own token",
    )
    dashboard_token: SecretStr | None = Field(None, description="deprecated name of dashboard_public_token")
    dashboard_secret: SecretStr | None = Field(
        None, description="key of the dashboard's session cookie; unset: generated once into the data directory"
    )
    dashboard_session_hours: float = Field(12.0, gt=0, le=24 * 90, description="how long a dashboard login lasts")
    dashboard_cookie_secure: bool | None = Field(
        None, description="mark the session cookie Secure; unset: when the request came over https"
    )
    dashboard_max_compare_runs: int = Field(
        20, ge=2, le=200, description="runs one /compare page may show; a longer list is refused on the page"
    )

    @field_validator("db")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql", "postgres://")):
            raise ValueError(
                f"MHPO_DB={value!r} is not supported: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
            )
        if value.startswith(("postgresql://", "postgres://")):
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        return value

    @model_validator(mode="after")
    def _deprecated_dashboard_token(self) -> Settings:
        if self.dashboard_token is not None:
            warnings.warn(
                "MHPO_DASHBOARD_TOKEN is deprecated: it makes the dashboard public (no login) for that "
                "token's project; name that choice MHPO_DASHBOARD_PUBLIC_TOKEN, or unset it so viewers "
                "log in with their own tokens",
                FutureWarning,
                stacklevel=2,
            )
            if self.dashboard_public_token is None:
                self.dashboard_public_token = self.dashboard_token
            self.dashboard_token = None
        return self
