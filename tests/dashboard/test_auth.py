"""The session cookie and the secret file of the dashboard's login (the login itself: test_login.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mhpo_dashboard.auth import Sessions, load_or_create_secret

SECRET = b"0123456789abcdef-secret"
TOKEN = "mhpo_" + "t" * 43


def test_a_sealed_token_opens_only_with_the_same_secret_and_is_not_readable() -> None:
    sessions = Sessions(SECRET, max_age_s=3600)
    cookie = sessions.seal(TOKEN)
    assert sessions.open(cookie) == TOKEN
    assert TOKEN not in cookie and "t" * 20 not in cookie
    assert Sessions(SECRET + b"x", max_age_s=3600).open(cookie) is None
    tampered = cookie[:-5] + ("A" if cookie[-5] != "A" else "B") + cookie[-4:]
    assert sessions.open(tampered) is None
    assert sessions.open("not a cookie ü") is None
    assert sessions.seal(TOKEN) != cookie, "a fresh nonce per login"


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        Sessions(b"short", max_age_s=60)


def test_processes_starting_together_share_one_generated_secret(tmp_path: Path) -> None:
    found: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: found.append(load_or_create_secret(tmp_path / "data"))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == 1 and len(found[0]) >= 32
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["dashboard-secret"]


def test_a_damaged_secret_file_is_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "dashboard-secret").write_text("\n")
    with pytest.raises(ValueError, match=r"dashboard-secret holds 0 bytes.*delete the file"):
        load_or_create_secret(tmp_path)
