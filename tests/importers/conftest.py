"""Sources written by the real libraries, and a way to read back what an import stored."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mhpo.cli import main as mhpo_main
from tests.conftest import strict_loads
from tests.integrations.conftest import count_reward, cpu_threads, grpo_config, prompts, tiny_model_dir

__all__ = ["tiny_model_dir"]


def run_import(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`mhpo import ...` in this process: (exit code, stdout, stderr)."""
    code = mhpo_main(["import", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


class Api:
    """GETs against the service on the database an import wrote to."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=60)
        response.raise_for_status()
        return strict_loads(response.text)  # non-finite numbers back as floats

    def runs(self, project: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/runs", project=project)["runs"]

    def series(self, run_id: str, key: str) -> dict[str, list[Any]]:
        return self.get(f"/api/v1/runs/{run_id}/scalars", keys=key, max_points=10_000)["series"][key]

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return self.get(f"/api/v1/runs/{run_id}/events")["events"]


@pytest.fixture
def api_on() -> Iterator[Any]:
    """`api_on(db_url)`: the service on that database, to read back what was imported."""
    from contextlib import ExitStack

    from mhpo_server.local import serving

    with ExitStack() as stack:
        yield lambda db: Api(stack.enter_context(serving(db)))


@pytest.fixture
def migrated(db_url: str) -> str:
    """The database at the schema head (SQLite is migrated by the import itself; PostgreSQL is not)."""
    import mhpo_migrations

    mhpo_migrations.upgrade(db_url)
    return db_url


@pytest.fixture(scope="session")
def trl_logdir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TensorBoard logdir written by a plain `trl.GRPOTrainer` run with report_to="tensorboard" (CPU)."""
    from trl import GRPOTrainer

    base = tmp_path_factory.mktemp("trl-tb")
    logdir = base / "logs"
    env = {
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "TENSORBOARD_LOGGING_DIR": str(logdir / "grpo-run"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        cpu_threads()
        args = grpo_config(base, max_steps=3, report_to=["tensorboard"], run_name="grpo-run")
        GRPOTrainer(model=str(tiny_model_dir), reward_funcs=count_reward, args=args, train_dataset=prompts()).train()
    assert list((logdir / "grpo-run").glob("*tfevents*")), os.listdir(logdir)
    return logdir
