"""Tokens beyond the route matrix: who a token is, revoking one, and the dashboard's settings checked at start."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mhpo.cli import main as mhpo_main
from mhpo_server.app import ConfigError, create_app
from mhpo_server.config import Settings
from mhpo_server.store import Store

SECRET = "s" * 32


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_whoami_names_the_tokens_project_and_scope(migrated_url: str, store: Store) -> None:
    read, write = store.create_token("alpha", "read"), store.create_token("beta", "write")
    with TestClient(create_app(Settings(db=migrated_url, auth=True, dashboard=False))) as client:
        assert client.get("/api/v1/auth/whoami", headers=_bearer(read)).json() == {
            "auth": True,
            "project": "alpha",
            "scope": "read",
        }
        assert client.get("/api/v1/auth/whoami", headers=_bearer(write)).json()["scope"] == "write"
        assert client.get("/api/v1/auth/whoami").status_code == 401
        assert client.get("/api/v1/auth/whoami", headers=_bearer(read + "x")).status_code == 401
    with TestClient(create_app(Settings(db=migrated_url, auth=False, dashboard=False))) as client:
        assert client.get("/api/v1/auth/whoami").json() == {"auth": False, "project": None, "scope": "write"}


def test_a_revoked_token_is_refused_on_the_next_request(migrated_url: str, store: Store) -> None:
    token = store.create_token("alpha", "read")
    with TestClient(create_app(Settings(db=migrated_url, auth=True, dashboard=False))) as client:
        assert client.get("/api/v1/runs", headers=_bearer(token)).status_code == 200
        assert store.revoke_token(token) and not store.revoke_token(token)
        assert client.get("/api/v1/runs", headers=_bearer(token)).status_code == 401
    assert store.resolve_token(token) is None


def test_token_revoke_command_reads_the_token_from_a_file(
    migrated_url: str, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(store.create_token("alpha", "write") + "\n")
    assert mhpo_main(["token", "revoke", "--token-file", str(token_file), "--db", migrated_url]) == 0
    assert store.resolve_token(token_file.read_text().strip()) is None
    assert mhpo_main(["token", "revoke", "--token-file", str(token_file), "--db", migrated_url]) == 1
    assert "not known" in capsys.readouterr().err


def test_the_public_dashboard_token_must_be_a_known_read_token(migrated_url: str, store: Store) -> None:
    read, write = store.create_token("alpha", "read"), store.create_token("alpha", "write")
    settings = {"db": migrated_url, "auth": True, "dashboard_secret": SECRET}
    with pytest.raises(ConfigError, match=r"MHPO_DASHBOARD_PUBLIC_TOKEN is a 'write' token .* must be a read token"):
        create_app(Settings(**settings, dashboard_public_token=write), store=store)
    with pytest.raises(ConfigError, match="not a token of this server"):
        create_app(Settings(**settings, dashboard_public_token=read + "x"), store=store)
    create_app(Settings(**settings, dashboard_public_token=read), store=store)
    with pytest.warns(FutureWarning, match="MHPO_DASHBOARD_TOKEN is deprecated"):
        old_name = Settings(**settings, dashboard_token=write)
    assert old_name.dashboard_public_token is not None and old_name.dashboard_token is None
    with pytest.raises(ConfigError, match="must be a read token"):
        create_app(old_name, store=store)


def test_serve_refuses_a_write_token_as_the_public_dashboard(
    migrated_url: str, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MHPO_DASHBOARD_PUBLIC_TOKEN", store.create_token("alpha", "write"))
    monkeypatch.setenv("MHPO_DASHBOARD_SECRET", SECRET)
    assert mhpo_main(["serve", "--db", migrated_url, "--auth", "--port", "1"]) == 2
    assert "must be a read token" in capsys.readouterr().err


def test_the_dashboard_secret_is_generated_once_into_the_data_directory(
    migrated_url: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    create_app(Settings(db=migrated_url, auth=True), store=store)
    secret_file = tmp_path / "mhpo" / "dashboard-secret"
    first = secret_file.read_bytes()
    assert len(first.strip()) >= 32 and stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    create_app(Settings(db=migrated_url, auth=True), store=store)
    assert secret_file.read_bytes() == first, "kept across restarts: logins survive them"
    assert [p.name for p in secret_file.parent.iterdir()] == ["dashboard-secret"]
    with pytest.raises(ConfigError, match="MHPO_DASHBOARD_SECRET has 5 characters"):
        create_app(Settings(db=migrated_url, auth=True, dashboard_secret="short"), store=store)


def test_token_list_shows_ids_and_fingerprints_and_revoke_takes_an_id(
    migrated_url: str, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mhpo_main(["token", "list", "--db", migrated_url]) == 0
    assert "no tokens" in capsys.readouterr().out
    token = store.create_token("alpha", "read")
    assert mhpo_main(["token", "list", "--db", migrated_url]) == 0
    out = capsys.readouterr().out
    listed = store.list_tokens()
    assert [(t["project"], t["scope"]) for t in listed] == [("alpha", "read")]
    assert hashlib.sha256(token.encode()).hexdigest()[:8] in out and token not in out
    assert mhpo_main(["token", "revoke", "--id", str(listed[0]["id"]), "--db", migrated_url]) == 0
    assert store.resolve_token(token) is None and store.list_tokens() == []
    assert mhpo_main(["token", "revoke", "--id", str(listed[0]["id"]), "--db", migrated_url]) == 1
    assert "no token has id" in capsys.readouterr().err
