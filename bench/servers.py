"""Servers the benchmarks start: `mhpo serve` on a migrated database, or any command with a health URL."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
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
def stalled_server() -> Iterator[str]:
    """A loopback URL that accepts connections and never answers, as a server stuck in a long request."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed at the end of the block
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in held:
            conn.close()


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def wait_quiet(min_idle: float = 0.8, seconds: int = 3, timeout: float = 180.0) -> float:
    """Wait until the machine's CPUs were at least `min_idle` idle for `seconds` one-second samples in a row.

    A server that reports healthy may still be starting helpers (MLflow's job consumers burn both cores
    of a 2-core machine for about a minute after its health check answers), which would slow whichever
    cell runs first. Returns the seconds waited; gives up after `timeout` (Linux only; 0 elsewhere).
    """
    if not Path("/proc/stat").exists():
        return 0.0
    start = time.monotonic()
    quiet = 0
    while quiet < seconds and time.monotonic() - start < timeout:
        idle0, total0 = _cpu_times()
        time.sleep(1.0)
        idle1, total1 = _cpu_times()
        quiet = quiet + 1 if (idle1 - idle0) >= min_idle * max(1, total1 - total0) else 0
    return time.monotonic() - start


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
