"""Alembic migrations of the service's database, importable so they ship with the package.

`upgrade(url)` is what `mhpo db upgrade` runs; `head()` is the revision the server needs;
`upgrade_sqlite(url)` is what `mhpo serve` (and so `mhpo demo`) runs first: a SQLite file is the
server's own, so it is created and migrated on first use, and after a package upgrade;
PostgreSQL is shared and left to an explicit `mhpo db upgrade`.
New revisions go in `versions/` as `NNNN_<what>.py` with `down_revision` set to the last one.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, make_url

HERE = Path(__file__).resolve().parent


def config(url: str) -> Config:
    """An Alembic config for `url` without an ini file (the URL travels in `attributes`)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["url"] = url
    return cfg


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite file URL; None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def sqlite_directory(url: str) -> None:
    """Create the folder of a SQLite file URL (SQLite creates the file, not its folder); other URLs pass."""
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def upgrade(url: str, revision: str = "head") -> None:
    sqlite_directory(url)
    command.upgrade(config(url), revision)


def head() -> str:
    """The newest revision of the scripts in `versions/`."""
    heads = ScriptDirectory.from_config(config("sqlite://")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations/versions has {len(heads)} heads {heads}; merge them into one")
    return heads[0]


def known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(config("sqlite://")).walk_revisions()}


def current(url: str) -> str | None:
    """The database's revision, None when it has no mhpo schema (or does not exist yet)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade_sqlite(url: str) -> bool:
    """Migrate a SQLite file to head when it is new or behind; True if it did.

    Other databases, in-memory SQLite and a file newer than this package are left alone: the
    server's schema check then refuses them with the command that fixes them.
    """
    if sqlite_file(url) is None:
        return False
    sqlite_directory(url)
    revision = current(url)
    if revision == head() or (revision is not None and revision not in known_revisions()):
        return False
    upgrade(url)
    return True
