"""Python client of the MHPO service: `mhpo.init`, `Run.log`, `Run.finish`, `fork`.

`log` only enqueues; a background thread batches, sends, retries with back-off, spools to
disk while the server is unreachable and replays the spool, also after the trainer restarts.
"""

from mhpo.client._run import (
    DEFAULT_PERSIST_TIMEOUT,
    DEFAULT_SERVER,
    DEFAULT_SPOOL_MAX_BYTES,
    FinishReport,
    MHPOClientError,
    Run,
    default_spool_dir,
    fork,
    init,
)

__all__ = [
    "DEFAULT_PERSIST_TIMEOUT",
    "DEFAULT_SERVER",
    "DEFAULT_SPOOL_MAX_BYTES",
    "FinishReport",
    "MHPOClientError",
    "Run",
    "default_spool_dir",
    "fork",
    "init",
]
