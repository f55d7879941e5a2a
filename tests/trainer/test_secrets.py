"""`mhpo train --token T` streams with T but never stores it in the run's config or its checkpoints."""

from __future__ import annotations

from pathlib import Path

import httpx
import torch

from mhpo.trainer import Trainer
from mhpo.trainer.trainer import STATE_FILE
from mhpo_server.store import open_store
from tests.fixtures.server import LiveServer
from tests.trainer.helpers import small_config


def test_the_token_never_reaches_the_config(sqlite_url: str, tmp_path: Path) -> None:
    with LiveServer(sqlite_url, env={"MHPO_AUTH": "true"}) as server:
        store = open_store(sqlite_url)
        try:
            write, read = store.create_token("t", "write"), store.create_token("t", "read")
        finally:
            store.close()
        trainer = Trainer(
            small_config(
                stream=True,
                server=server.url,
                token=write,
                project="t",
                name="secret",
                checkpoint_dir=str(tmp_path / "ckpt"),
            )
        )
        trainer.train()
        checkpoint = trainer.save_checkpoint()
        runs = httpx.get(f"{server.url}/api/v1/runs", headers={"Authorization": f"Bearer {read}"})
    assert runs.status_code == 200
    (run,) = runs.json()["runs"]
    assert (run["name"], run["last_step"]) == ("secret", 1)  # streamed with the token
    assert "token" not in run["config"] and run["config"]["max_new_tokens"] == 4
    assert write not in runs.text
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    assert "token" not in state["config"]
