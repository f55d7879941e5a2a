"""`mhpo demo --steps N --no-serve`: starts the service, streams an MHPO and a GRPO run, exits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.fixtures.server import REPO_ROOT, LiveServer, free_port


def test_demo_runs_both_losses_and_exits(tmp_path: Path) -> None:
    port = free_port()
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mhpo",
            "demo",
            "--steps",
            "1",
            "--no-serve",
            "--no-progress",
            "--port",
            str(port),
            "--db",
            db,
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"dashboard: http://127.0.0.1:{port}/" in proc.stdout
    with LiveServer(db) as server:  # the demo's server is gone; read what it stored through a fresh one
        runs = httpx.get(f"{server.url}/api/v1/runs", params={"project": "demo"}).json()["runs"]
    assert sorted((r["loss"], r["status"]) for r in runs) == [("grpo", "finished"), ("mhpo", "finished")]
    assert len({r["last_step"] for r in runs}) == 1
