"""docker-compose.yml and the Dockerfile: validated by Compose itself and checked for what we rely on.

`docker compose config` (or the standalone `docker-compose config`) parses and validates the
file without a container engine; CI installs the standalone one.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ]", spec, maxsplit=1)[0].lower() for spec in specs}


def compose_command() -> list[str] | None:
    """`docker compose` where the v2 plugin is installed, else `docker-compose`, else None."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run([*command, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_compose_file() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "server"}
    db, server = services["db"], services["server"]
    assert db["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert server["depends_on"]["db"]["condition"] == "service_healthy"
    command = " ".join(server["command"])
    assert command.index("mhpo db upgrade") < command.index("mhpo serve"), "migrates before serving"
    assert "--host 0.0.0.0" in command and "--insecure-public" in command
    assert (
        server["environment"]["MHPO_DB"].startswith("postgresql+psycopg://")
        and "@db:5432/" in server["environment"]["MHPO_DB"]
    )
    assert all(port.startswith("127.0.0.1:") for port in server["ports"]), "published on loopback only"
    assert "/healthz" in " ".join(server["healthcheck"]["test"])
    assert server["build"] == "." and (REPO / "Dockerfile").is_file()
    assert set(compose["volumes"]) == {"pgdata"}


def test_dockerfile_installs_only_declared_dependencies() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    install = dockerfile.split("pip install --no-cache-dir --no-deps .", 1)[1].split("useradd", 1)[0]
    specs = [token for token in shlex.split(install.replace("\\\n", " ")) if re.match(r"^[A-Za-z]", token)]
    specs = [s for s in specs if s not in {"pip", "install"}]
    declared = requirement_names(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    wanted = requirement_names(specs)
    assert wanted and wanted <= declared, wanted - declared
    assert "torch" not in wanted and "transformers" not in wanted
    for package in ("migrations", "server", "mhpo", "dashboard"):
        assert f"COPY {package} ./{package}" in dockerfile
