"""Alembic environment: online migrations against the URL passed by `mhpo_migrations.config(url)`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from mhpo_server.store.models import Base

cfg = context.config
url = cfg.attributes.get("url") or cfg.get_main_option("sqlalchemy.url")
if not url:
    raise RuntimeError("no database URL: run `mhpo db upgrade --db URL` (or set MHPO_DB)")

engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
