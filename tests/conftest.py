"""Shared fixtures: database URLs (a fresh SQLite file or PostgreSQL database per test) and Chromium.

A missing PostgreSQL or Chromium skips the tests that need it, unless MHPO_REQUIRE_PG /
MHPO_REQUIRE_BROWSER is set (CI sets both): then it fails them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.fixtures.server"]  # the live-server fixtures, for every test module

PG_URL_ENV = "MHPO_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def _missing(resource: str, env: str, why: str) -> None:
    if os.environ.get(env):
        pytest.fail(f"{resource} is required ({env} is set) but unavailable: {why}")
    pytest.skip(f"{resource} unavailable: {why}")


def _pg_admin_url() -> str:
    return os.environ.get(PG_URL_ENV, DEFAULT_PG_URL)


def _psycopg_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _bare_token(token: str) -> float:
    raise AssertionError(
        f"the answer holds the bare token {token}, which is not JSON: the server writes it as a string"
    )


def _numbers(value: Any) -> Any:
    if isinstance(value, str):
        return NON_FINITE.get(value, value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def strict_loads(text: str) -> Any:
    """An answer of the API read as strict JSON (a bare NaN / Infinity token fails the test), with the strings
    "NaN", "Infinity" and "-Infinity" read back as floats (test data uses them for nothing else)."""
    return _numbers(json.loads(text, parse_constant=_bare_token))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mhpo.db'}"


@contextmanager
def fresh_pg_database(prefix: str = "mhpo_test", template: str | None = None) -> Iterator[str]:
    """Create a PostgreSQL database (empty, or a copy of `template`), yield its URL, drop it after."""
    try:
        import psycopg

        admin = psycopg.connect(_psycopg_dsn(_pg_admin_url()), autocommit=True, connect_timeout=3)
    except Exception as exc:
        _missing("PostgreSQL", "MHPO_REQUIRE_PG", str(exc))
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        try:
            yield f"{_pg_admin_url().rsplit('/', 1)[0]}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Every store/API test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    found = shutil.which("chromium")
    if found:
        return found
    _missing("Chromium", "MHPO_REQUIRE_BROWSER", "no chromium binary (apt-get install chromium)")
    raise AssertionError("unreachable")
