"""The container's environment, built without Docker: what `docker build` would install, serving.

The test takes the files the Dockerfile copies, builds the wheel from exactly those, creates a
fresh venv and installs the wheel with the Dockerfile's own `pip install` arguments (read from
the Dockerfile, so the two cannot part). In that venv it runs `mhpo db upgrade` (the image's
command) and `mhpo serve` on a new SQLite file (migrated on first use) on a loopback port,
posts a run with `log_ratio` histograms over HTTP, opens its page and the page's callbacks, and
asserts: no 5xx, no torch in the venv, no import name outside `mhpo*` in the wheel.

Slow (about a minute on a quiet machine, more under load): the venv's dependencies come from
the package index. It runs in CI like every other test. pip's bytecode compilation is skipped
(`--no-compile`): it changes no installed file's presence, only the time the install takes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from mhpo.demo import wait_healthy
from tests.dashboard import dash_http
from tests.dashboard.seeding import seed_run
from tests.fixtures.server import free_port

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def copied_paths() -> list[str]:
    """The build-context paths the Dockerfile's COPY instructions take."""
    paths = []
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            paths += shlex.split(args)[:-1]
    return paths


def pip_install_args() -> list[str]:
    """The arguments after `pip install` in the Dockerfile's RUN; its one target must be `.` (the project)."""
    commands = [
        shlex.split(part)
        for instruction, args in dockerfile_instructions()
        if instruction == "RUN"
        for part in args.split("&&")
        if part.split()[:2] == ["pip", "install"]
    ]
    assert len(commands) == 1, f"expected one `pip install` in the Dockerfile, got {commands}"
    args = commands[0][2:]
    targets = [a for a in args if not a.startswith("-")]
    assert targets == ["."], f"the image must install the project from its metadata, not a list: {targets}"
    return args


def run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=timeout)


def test_the_dockerfile_installs_the_project_from_its_metadata() -> None:
    assert pip_install_args() == ["--no-cache-dir", "."]
    assert set(copied_paths()) >= {"pyproject.toml", "README.md", "mhpo", "server", "dashboard", "migrations"}


def test_the_image_environment_serves_a_run_page_with_histograms(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for path in copied_paths():
        source = REPO / path
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        if source.is_dir():
            shutil.copytree(source, context / path, ignore=ignore)
        else:
            shutil.copy2(source, context / path)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env |= {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
        cwd=context,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("mhpo-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {
        "mhpo",
        "mhpo_server",
        "mhpo_dashboard",
        "mhpo_migrations",
    }

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python, mhpo = str(venv / "bin" / "python"), str(venv / "bin" / "mhpo")
    args = [str(wheel) if a == "." else a for a in pip_install_args()]
    installed = run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile", *args], env)
    assert installed.returncode == 0, installed.stderr[-4000:]
    absent = run(
        [python, "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers') if u.find_spec(m)])"],
        env,
    )
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr

    upgraded = run([mhpo, "db", "upgrade", "--db", f"sqlite:///{tmp_path / 'upgraded.db'}"], env)
    assert upgraded.returncode == 0 and "is at revision" in upgraded.stdout, upgraded.stderr
    refused = run([mhpo, "train", "--steps", "1"], env)
    assert refused.returncode == 2 and "pip install 'mhpo[train]'" in refused.stderr, refused.stderr

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [mhpo, "serve", "--db", f"sqlite:///{tmp_path / 'new' / 'mhpo.db'}", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(f"{url}/healthz", server, timeout=120)
        run_id = seed_run(url, "image", "dapo-run", "dapo", {"hparams": {"eps_high": 0.3}}, steps=6)
        with httpx.Client(base_url=url, timeout=60) as client:
            for path in ("/", f"/runs/{run_id}", "/_dash-layout", "/_dash-dependencies"):
                assert client.get(path).status_code == 200, path
            routed, found = dash_http.route(client, f"/runs/{run_id}")
            assert routed.status_code == 200, routed.text
            names = [t.get("name") for t in found["run-step-histogram"]["figure"]["data"]]
            assert "M(x) dapo A>0" in names and "M(x) mhpo A<0" in names, names
            found["run-selected"]["data"] = {"step": 2, "follow": False}
            answers = {
                output: dash_http.fire(client, output, found)
                for output in ("run-step-histogram.figure", "run-flags.children", "run-keys.data")
            }
            assert {o: a.status_code for o, a in answers.items()} == dict.fromkeys(answers, 200)
            redrawn = answers["run-step-histogram.figure"].json()["response"]["run-step-histogram"]["figure"]
            assert redrawn["layout"]["title"]["text"].startswith("step 2:")
            assert "M(x) dapo A>0" in [t.get("name") for t in redrawn["data"]]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    served = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in served, served[-4000:]
