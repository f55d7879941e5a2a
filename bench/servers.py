"""Servers the benchmarks start: `mhpo serve` on a migrated database, or any command with a health URL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mhpo.demo import wait_healthy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(
    cmd: list[str], health_url: str, log_path: Path, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> Iterator[None]:
    """Run a server process until the block ends; wait for its health URL first (its output goes to `log_path`)."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        try:
            wait_healthy(health_url, proc, timeout=120)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: see {log_path}") from exc
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def mhpo_server(
    db_url: str | None = None, workdir: Path | None = None, code_dir: Path = REPO_ROOT, workers: int = 1
) -> Iterator[str]:
    """`mhpo db upgrade` then `mhpo serve --workers N` of the checkout `code_dir` on `db_url` (default: a
    fresh SQLite file in `workdir`, itself a new temporary directory by default); yields the base URL."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="mhpo-bench-"))
    db_url = db_url or f"sqlite:///{workdir / 'mhpo.db'}"
    env = {"PYTHONPATH": str(code_dir)}
    subprocess.run(
        [sys.executable, "-m", "mhpo", "db", "upgrade", "--db", db_url],
        cwd=code_dir,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    port = free_port()
    cmd = [sys.executable, "-m", "mhpo", "serve", "--db", db_url, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(workers)]
    with serve(cmd, f"http://127.0.0.1:{port}/healthz", workdir / "mhpo-serve.log", env, code_dir):
        yield f"http://127.0.0.1:{port}"
