"""`mhpo serve`, `mhpo db upgrade` and `mhpo token create|list|revoke` (dispatched here by mhpo/cli.py)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mhpo_server.config import DEFAULT_PORT, Settings

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    overrides: dict[str, Any] = {}
    for name in ("db", "host", "port", "auth", "insecure_public", "dashboard"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", help="SQLAlchemy URL (default: $MHPO_DB, else a SQLite file in the user data dir)")


def serve(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mhpo serve", description="Run the API (uvicorn).")
    _db_arg(parser)
    parser.add_argument("--host", help="listen address (default 127.0.0.1, $MHPO_HOST)")
    parser.add_argument("--port", type=int, help=f"listen port (default {DEFAULT_PORT}, $MHPO_PORT)")
    parser.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require API tokens (default off, $MHPO_AUTH)",
    )
    parser.add_argument(
        "--dashboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve the dashboard at / (default on, $MHPO_DASHBOARD)",
    )
    parser.add_argument(
        "--insecure-public",
        action="store_true",
        default=None,
        help="allow a non-loopback --host with auth off (anyone who reaches it can read and write)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (default 1); flags stay exact across them",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    settings = _settings(args)
    if not settings.auth and not is_loopback(settings.host) and not settings.insecure_public:
        print(
            f"mhpo serve: refusing --host {settings.host} with auth off (anyone on the network could write and "
            "read runs). Turn auth on with --auth (and `mhpo token create`), or pass --insecure-public.",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    import mhpo_migrations
    from mhpo_server.app import ConfigError, create_app
    from mhpo_server.http import with_header_timeout
    from mhpo_server.store import SchemaError

    try:
        if mhpo_migrations.upgrade_sqlite(settings.db):
            print(f"mhpo serve: migrated {settings.db} to revision {mhpo_migrations.head()}", file=sys.stderr)
        app = create_app(settings)
    except (SchemaError, ConfigError) as exc:
        print(f"mhpo serve: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"mhpo serve: --workers {args.workers} must be >= 1", file=sys.stderr)
        return 2
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": args.log_level,
        "access_log": args.access_log,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
    }
    if args.workers == 1:
        uvicorn.run(app, http=with_header_timeout(settings.header_timeout_s), **common)
        return 0
    app.state.store.close()  # each worker process builds its own app from the same settings
    os.environ.update(
        {
            f"MHPO_{name.upper()}": str(value)
            for name, value in settings.model_dump().items()
            if isinstance(value, str | int | float | bool)
        }
    )
    # Workers are spawned processes: they get the protocol by import path, its deadline from MHPO_HEADER_TIMEOUT_S.
    uvicorn.run(
        "mhpo_server.app:create_app",
        factory=True,
        workers=args.workers,
        http="mhpo_server.http:HeaderTimeoutProtocol",
        **common,
    )
    return 0


def db(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mhpo db", description="Database schema (Alembic).")
    sub = parser.add_subparsers(dest="action", required=True)
    upgrade = sub.add_parser("upgrade", help="migrate the database to the newest schema")
    _db_arg(upgrade)
    args = parser.parse_args(argv)
    from sqlalchemy import make_url

    import mhpo_migrations

    settings = _settings(args)
    mhpo_migrations.upgrade(settings.db)
    print(
        f"database {make_url(settings.db).render_as_string(hide_password=True)} is at revision {mhpo_migrations.head()}"
    )
    return 0


def token(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mhpo token", description="API tokens (stored hashed; shown once).")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create a token and print it")
    create.add_argument("--project", required=True, help="the project the token may access")
    create.add_argument("--scope", required=True, choices=["write", "read"], help="write (trainers) or read (viewers)")
    _db_arg(create)
    revoke = sub.add_parser("revoke", help="delete a token: the API and dashboard refuse it from the next request")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--token-file", help="file holding the token to revoke (not an argument: it would show in `ps` and history)"
    )
    which.add_argument("--id", type=int, help="the token's id as `mhpo token list` shows it")
    _db_arg(revoke)
    listing = sub.add_parser("list", help="list tokens: id, project, scope, created (UTC), SHA-256 fingerprint")
    _db_arg(listing)
    args = parser.parse_args(argv)
    from mhpo_server.schemas import invalid_key
    from mhpo_server.store import SchemaError, open_store

    if args.action == "create":
        # The same rule as a project name in the API; a non-UTF-8 argument arrives as a lone surrogate.
        reason = invalid_key(args.project) if len(args.project) <= 200 else "longer than 200 characters"
        if reason is not None:
            print(f"mhpo token: --project is not a valid project name: {reason}", file=sys.stderr)
            return 2
    store = open_store(_settings(args).db)
    try:
        store.check_schema()
        if args.action == "create":
            print(store.create_token(args.project, args.scope))
        elif args.action == "list":
            _print_tokens(store.list_tokens())
        elif args.id is not None:
            if not store.revoke_token_id(args.id):
                print(f"mhpo token: no token has id {args.id}; `mhpo token list` shows the ids", file=sys.stderr)
                return 1
        elif not store.revoke_token(Path(args.token_file).read_text().strip()):
            print(f"mhpo token: the token in {args.token_file} is not known to this database", file=sys.stderr)
            return 1
    except SchemaError as exc:
        print(f"mhpo token: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def _print_tokens(tokens: list[dict[str, Any]]) -> None:
    """A table; the fingerprint is the start of `printf %s TOKEN | sha256sum`, to tell tokens apart."""
    if not tokens:
        print("no tokens; create one with `mhpo token create --project P --scope write|read`")
        return
    print(f"{'id':>4}  {'project':<20} {'scope':<6} {'created (UTC)':<20} fingerprint")
    for t in tokens:
        created = datetime.fromtimestamp(t["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{t['id']:>4}  {t['project']:<20} {t['scope']:<6} {created:<20} {t['fingerprint']}")


def main(command: str, argv: Sequence[str]) -> int:
    handlers = {"serve": serve, "db": db, "token": token}
    if command not in handlers:
        print(f"mhpo_server.cli: unknown command {command!r}; valid: {', '.join(handlers)}", file=sys.stderr)
        return 2
    return handlers[command](list(argv))
