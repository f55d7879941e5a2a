"""Fixtures for the service tests: a migrated database, its store, an app and a client over it.

Migrating costs a second per database, so each session migrates one template per backend
(a SQLite file, a PostgreSQL template database) and every test gets a fresh copy of it.
`tests/server/test_migrations.py` runs the migrations themselves on empty databases.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import migrations
from server.app import create_app
from server.config import Settings
from server.store import Store, open_store
from tests.conftest import _missing, _pg_admin_url, _psycopg_dsn


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "mhpo.db"
    migrations.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    try:
        import psycopg

        admin = psycopg.connect(_psycopg_dsn(_pg_admin_url()), autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001 - any connection failure means "not available"
        _missing("PostgreSQL", "MHPO_REQUIRE_PG", str(exc))
    name = f"mhpo_tmpl_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            migrations.upgrade(f"{_pg_admin_url().rsplit('/', 1)[0]}/{name}")
            yield name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at the migrations' head: once on SQLite, once on PostgreSQL."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        shutil.copyfile(template, tmp_path / "mhpo.db")
        yield f"sqlite:///{tmp_path / 'mhpo.db'}"
        return
    import psycopg

    template_name = request.getfixturevalue("pg_template")
    name = f"mhpo_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_psycopg_dsn(_pg_admin_url()), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
        try:
            yield f"{_pg_admin_url().rsplit('/', 1)[0]}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def store(migrated_url: str) -> Iterator[Store]:
    s = open_store(migrated_url)
    yield s
    s.close()


@pytest.fixture
def app(migrated_url: str) -> FastAPI:
    return create_app(Settings(db=migrated_url, auth=False, dashboard=False))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def post_json(client: TestClient | httpx.Client, url: str, body: Any, **kwargs: Any) -> httpx.Response:
    """POST with Python's json encoding, so NaN/Infinity go out as the bare tokens of contract C1."""
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return client.post(url, content=json.dumps(body), headers=headers, **kwargs)


def new_run(client: TestClient | httpx.Client, project: str = "p", name: str = "r", **extra: Any) -> str:
    response = post_json(client, "/api/v1/runs", {"project": project, "name": name, **extra})
    assert response.status_code == 201, response.text
    return response.json()["run_id"]
