"""Alembic: head on an empty database matches the ORM models; stale or missing schemas are refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

import mhpo_migrations
import mhpo_server.app  # noqa: F401  (imports every model the app uses, so all tables are compared)
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.store import SchemaError, open_store
from mhpo_server.store.models import Base

REPO = Path(__file__).resolve().parents[2]


def test_upgrade_to_head_matches_models(db_url: str) -> None:
    mhpo_migrations.upgrade(db_url)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == mhpo_migrations.head()
    engine.dispose()
    mhpo_migrations.upgrade(db_url)  # a second upgrade is a no-op


def test_server_refuses_unmigrated_database(db_url: str) -> None:
    with pytest.raises(SchemaError) as info:
        create_app(Settings(db=db_url, dashboard=False))
    assert "not migrated" in str(info.value) and "mhpo db upgrade --db" in str(info.value)


def test_server_refuses_stale_and_unknown_revisions(db_url: str) -> None:
    mhpo_migrations.upgrade(db_url, "0001")
    store = open_store(db_url)
    try:
        if mhpo_migrations.head() != "0001":
            with pytest.raises(SchemaError, match=r"behind the server's .*mhpo db upgrade"):
                store.check_schema()
        with store.engine.begin() as conn:  # type: ignore[attr-defined]
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
        with pytest.raises(SchemaError, match="newer than this server"):
            store.check_schema()
    finally:
        store.close()


def test_migrations_ship_as_a_package() -> None:
    """`mhpo_migrations` works from a non-editable install: a package with env.py, the template and versions/."""
    here = Path(mhpo_migrations.__file__).parent
    assert (here / "env.py").is_file() and (here / "script.py.mako").is_file()
    assert (here / "versions" / "__init__.py").is_file() and (here / "versions" / "0001_initial.py").is_file()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "migrations" in project["tool"]["setuptools"]["packages"]["find"]["where"]
    assert "*.mako" in project["tool"]["setuptools"]["package-data"]["*"]
