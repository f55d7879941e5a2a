"""Servers shared by the client tests that do not crash them (each test makes its own runs).

The shared SQLite server runs with auth on, so every test that uses it also proves the
client sends its token; its clients write to project "client" with a write token.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mhpo_server.store import open_store
from tests.client.helpers import Target
from tests.conftest import fresh_pg_database
from tests.fixtures.server import LiveServer

PROJECT = "client"


@pytest.fixture(scope="session")
def shared_sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    db_url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'mhpo.db'}"
    with LiveServer(db_url, env={"MHPO_AUTH": "true"}) as server:
        store = open_store(db_url)
        try:
            token = store.create_token(PROJECT, "write")
        finally:
            store.close()
        yield Target(server, token)


@pytest.fixture(scope="session")
def shared_pg_server() -> Iterator[Target]:
    """A server (auth off) on a fresh PostgreSQL database, dropped after the session."""
    with fresh_pg_database("mhpo_client") as url, LiveServer(url) as server:
        yield Target(server)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_server(request: pytest.FixtureRequest) -> Target:
    """A running server, once on SQLite (auth on) and once on PostgreSQL (auth off)."""
    return request.getfixturevalue(f"shared_{'pg' if request.param == 'postgres' else 'sqlite'}_server")
