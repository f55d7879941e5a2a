"""`mhpo serve`, `mhpo db upgrade`, `mhpo token create`, and a real server process (contract C8)."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, make_url, text

import mhpo_migrations
from mhpo.cli import main as mhpo_main
from mhpo_server.cli import is_loopback
from mhpo_server.config import Settings
from mhpo_server.store import open_store
from tests.conftest import strict_loads
from tests.fixtures.server import LiveServer
from tests.server.conftest import new_run, post_json


def test_db_upgrade_and_token_create(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert mhpo_main(["token", "create", "--project", "p", "--scope", "write", "--db", sqlite_url]) == 2
    assert "mhpo db upgrade --db" in capsys.readouterr().err
    assert mhpo_main(["db", "upgrade", "--db", sqlite_url]) == 0
    assert mhpo_main(["token", "create", "--project", "p", "--scope", "read", "--db", sqlite_url]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    store = open_store(sqlite_url)
    info = store.resolve_token(token)
    store.close()
    assert info is not None and (info.project, info.scope) == ("p", "read")


def test_commands_on_a_sqlite_file_in_a_missing_folder_create_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command that takes --db treats a SQLite file in a folder that does not exist yet as `mhpo serve`
    does: the folder is made; a command that needs a migrated database still says which command migrates it."""
    token_db = f"sqlite:///{tmp_path / 'a' / 'b' / 'tokens.db'}"
    assert mhpo_main(["token", "create", "--project", "p", "--scope", "write", "--db", token_db]) == 2
    assert "mhpo db upgrade --db" in capsys.readouterr().err
    upgraded = f"sqlite:///{tmp_path / 'c' / 'd' / 'mhpo.db'}"
    assert mhpo_main(["db", "upgrade", "--db", upgraded]) == 0
    assert mhpo_migrations.current(upgraded) == mhpo_migrations.head()
    csv_file = tmp_path / "run.csv"
    csv_file.write_text("step,loss\n0,1.0\n1,0.5\n")
    imported = f"sqlite:///{tmp_path / 'e' / 'f' / 'import.db'}"
    assert mhpo_main(["import", "csv", str(csv_file), "--project", "p", "--db", imported]) == 0
    store = open_store(imported)
    try:
        assert [run.name for run in store.list_runs(project="p")] == ["run"]
    finally:
        store.close()


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MHPO_DB", "postgres://u@h/d")
    monkeypatch.setenv("MHPO_AUTH", "true")
    monkeypatch.setenv("MHPO_MAX_BODY_BYTES", "2048")
    settings = Settings()
    assert (settings.db, settings.auth, settings.max_body_bytes) == ("postgresql+psycopg://u@h/d", True, 2048)
    with pytest.raises(ValidationError, match="mysql"):
        Settings(db="mysql://u@h/d")
    monkeypatch.delenv("MHPO_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Settings().db == f"sqlite:///{tmp_path / 'mhpo' / 'mhpo.db'}", "default: a file in the user data dir"


def test_serve_refuses_public_host_without_auth(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert mhpo_main(["serve", "--db", sqlite_url, "--host", "0.0.0.0"]) == 2
    assert "--insecure-public" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_serve_creates_and_migrates_a_new_sqlite_file(tmp_path: Path) -> None:
    """First use: no file, not even its directory; `mhpo serve` alone makes a working store."""
    url = f"sqlite:///{tmp_path / 'not' / 'yet' / 'mhpo.db'}"
    with LiveServer(url, migrate=False) as server, httpx.Client(base_url=server.url) as client:
        run_id = new_run(client)
        assert client.get(f"/api/v1/runs/{run_id}").status_code == 200
        assert f"migrated {url} to revision {mhpo_migrations.head()}" in server.log()
    assert mhpo_migrations.current(url) == mhpo_migrations.head()


def test_serve_refuses_a_sqlite_file_newer_than_the_package(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mhpo_migrations.upgrade(sqlite_url)
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    engine.dispose()
    assert mhpo_main(["serve", "--db", sqlite_url, "--port", "1"]) == 2
    assert "newer than this server knows" in capsys.readouterr().err
    assert mhpo_migrations.current(sqlite_url) == "f00dfeed"


@pytest.mark.postgres
def test_serve_refuses_unmigrated_postgres(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL is shared: its schema changes only through an explicit `mhpo db upgrade`."""
    assert mhpo_main(["serve", "--db", pg_url, "--port", "1"]) == 2
    assert f"mhpo db upgrade --db {make_url(pg_url).render_as_string(hide_password=True)}" in capsys.readouterr().err
    assert mhpo_migrations.current(pg_url) is None


def test_live_server_survives_sigkill(live_server: LiveServer) -> None:
    """What a real `mhpo serve` acknowledged is still there after SIGKILL and a restart."""
    with httpx.Client(base_url=live_server.url) as client:
        run_id = new_run(client)
        records = {
            "batch_id": str(uuid.uuid4()),
            "records": [{"step": s, "time": 1.0, "scalars": {"loss": math.nan if s == 3 else s}} for s in range(10)],
        }
        assert post_json(client, f"/api/v1/runs/{run_id}/records", records).json() == {
            "accepted": 10,
            "duplicates": 0,
            "rejected": [],
        }
    live_server.kill()
    assert not live_server.running
    live_server.start()
    with httpx.Client(base_url=live_server.url) as client:
        answer = client.get(f"/api/v1/runs/{run_id}/scalars", params={"keys": "loss"})
        series = strict_loads(answer.text)["series"]["loss"]
        assert series["step"] == list(range(10)) and math.isnan(series["value"][3])
        assert post_json(client, f"/api/v1/runs/{run_id}/records", records).json() == {
            "accepted": 0,
            "duplicates": 10,
            "rejected": [],
        }
        assert "mhpo_http_requests_total" in client.get("/metrics").text
