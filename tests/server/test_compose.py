"""docker-compose.yml and the Dockerfile, checked statically (no container engine in the test run).

`docker compose config` is the authoritative check; where an engine is available run it too.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ]", spec, maxsplit=1)[0].lower() for spec in specs}


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
    assert server["environment"]["MHPO_DB"].startswith("postgresql+psycopg://") and "@db:5432/" in server["environment"]["MHPO_DB"]
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
