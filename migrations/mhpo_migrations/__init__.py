"""Alembic migrations of the service's database, importable so they ship with the package.

`upgrade(url)` is what `mhpo db upgrade` runs; `head()` is the revision the server needs.
New revisions go in `versions/` as `NNNN_<what>.py` with `down_revision` set to the last one.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

HERE = Path(__file__).resolve().parent


def config(url: str) -> Config:
    """An Alembic config for `url` without an ini file (the URL travels in `attributes`)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(config(url), revision)


def head() -> str:
    """The newest revision of the scripts in `versions/`."""
    heads = ScriptDirectory.from_config(config("sqlite://")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations/versions has {len(heads)} heads {heads}; merge them into one")
    return heads[0]


def known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(config("sqlite://")).walk_revisions()}
