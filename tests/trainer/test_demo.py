"""`mhpo demo --steps N --no-serve`: starts the service, streams an MHPO and a GRPO run, exits.

Also what it says: the dashboard URL before any training, one line per phase, and no progress
bar of any library under `--no-progress`. The SQLite file is new: the server migrates it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import REPO_ROOT, LiveServer, free_port


def demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`mhpo demo ARGS` in a subprocess of this repository's code."""
    return subprocess.run(
        [sys.executable, "-m", "mhpo", "demo", *args],
        check=False,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_runs_both_losses_and_exits(tmp_path: Path) -> None:
    port = free_port()
    db = f"sqlite:///{tmp_path / 'new' / 'demo.db'}"
    proc = demo("--steps", "1", "--no-serve", "--no-progress", "--port", str(port), "--db", db, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert all(line.startswith("mhpo demo: ") for line in lines), proc.stdout
    said = [line.removeprefix("mhpo demo: ") for line in lines]
    dashboard = said.index(f"dashboard: http://127.0.0.1:{port}/ (open it now: the runs appear there as they train)")
    phases = [i for i, line in enumerate(said) if line.startswith("[")]
    assert dashboard < phases[0], "the URL comes before the model is built"
    assert said[phases[0]].startswith("[1/3] preparing the tiny model")
    assert said[phases[2]].startswith("[2/3] training mhpo-addition-s0 (1 rollout steps): http://127.0.0.1:")
    assert said[phases[4]].startswith("[3/3] training grpo-addition-s0 (1 rollout steps): http://127.0.0.1:")
    assert said[-1].endswith(f"dashboard: http://127.0.0.1:{port}/")
    for bar in ("it/s]", "%|", "Loading weights", "Writing model shards"):
        assert bar not in proc.stdout + proc.stderr, f"a progress bar under --no-progress: {bar!r}\n{proc.stderr}"
    with LiveServer(db) as server:  # the demo's server is gone; read what it stored through a fresh one
        runs = httpx.get(f"{server.url}/api/v1/runs", params={"project": "demo"}).json()["runs"]
    assert sorted((r["loss"], r["status"]) for r in runs) == [("grpo", "finished"), ("mhpo", "finished")]
    assert len({r["last_step"] for r in runs}) == 1


@pytest.mark.postgres
def test_demo_on_an_unmigrated_postgres_database_refuses_with_the_fix(pg_url: str) -> None:
    """PostgreSQL is never migrated behind the user's back, by the demo neither."""
    proc = demo("--no-serve", "--port", str(free_port()), "--db", pg_url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "mhpo db upgrade --db postgresql" in proc.stderr
    assert "the server exited with code 2" in proc.stdout and "[1/3]" not in proc.stdout


def test_demo_refuses_a_port_another_server_holds(live_server: LiveServer, tmp_path: Path) -> None:
    """A taken port would answer the demo's health check: the runs would land in that server's database."""
    port = int(live_server.url.rsplit(":", 1)[1])
    runs_before = httpx.get(f"{live_server.url}/api/v1/runs").json()["runs"]
    proc = demo(
        "--steps", "1", "--no-serve", "--no-progress", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'mine.db'}"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stdout and "--port" in proc.stdout
    assert "[1/3]" not in proc.stdout
    assert httpx.get(f"{live_server.url}/api/v1/runs").json()["runs"] == runs_before
