"""Fixtures for the service tests: a migrated database, its store, an app and a client over it.

Migrating costs a second per database, so each session migrates one template per backend
(a SQLite file, a PostgreSQL template database) and every test gets a fresh copy of it.
`tests/server/test_migrations.py` runs the migrations themselves on empty databases.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import mhpo_migrations
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.store import Store, open_store
from tests.conftest import fresh_pg_database


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "mhpo.db"
    mhpo_migrations.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    with fresh_pg_database("mhpo_tmpl") as url:
        mhpo_migrations.upgrade(url)
        yield url.rsplit("/", 1)[1]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at the migrations' head: once on SQLite, once on PostgreSQL."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        shutil.copyfile(template, tmp_path / "mhpo.db")
        yield f"sqlite:///{tmp_path / 'mhpo.db'}"
        return
    with fresh_pg_database(template=request.getfixturevalue("pg_template")) as url:
        yield url


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
