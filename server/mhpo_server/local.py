"""The service in this process, on a loopback port, for tools that write "straight into a database".

`mhpo import ... --db URL` runs the same app as `mhpo serve` (no dashboard, auth off, loopback
only) in a background thread and sends its batches to it over HTTP, so imported points take the
one ingest path (validation, the run's turn, flags, alert rules) rather than a second writer. A
SQLite database is migrated first, as the default database is on first use; a PostgreSQL one
must already be (`mhpo db upgrade --db URL`), and the app says so if it is not.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

START_TIMEOUT_S = 60.0


@contextmanager
def serving(db: str) -> Iterator[str]:
    """The base URL of the service running on `db` until the block ends."""
    import uvicorn

    import mhpo_migrations
    from mhpo_server.app import create_app
    from mhpo_server.config import Settings

    settings = Settings(db=db, dashboard=False, auth=False, host="127.0.0.1")
    if settings.db.startswith("sqlite"):
        mhpo_migrations.upgrade(settings.db)
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mhpo-local-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the service on {settings.db} did not start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
