"""docker-compose.yml: validated by Compose itself and checked for what we rely on (the image's
environment itself is built and served by tests/server/test_image.py).

`docker compose config` (or the standalone `docker-compose config`) parses and validates the
file without a container engine; CI installs the standalone one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def compose_command() -> list[str] | None:
    """`docker compose` where the v2 plugin is installed, else `docker-compose`, else None."""
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], check=False, capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run(
        [*command, "config", "-q"], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )
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
