"""Trainer test fixtures: one tiny-model cache and one client spool per session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The warmed-up tiny model is built once per session (and shared with subprocesses)."""
    saved = {k: os.environ.get(k) for k in ("MHPO_CACHE_DIR", "MHPO_SPOOL_DIR")}
    os.environ["MHPO_CACHE_DIR"] = str(tmp_path_factory.mktemp("mhpo-cache"))
    os.environ["MHPO_SPOOL_DIR"] = str(tmp_path_factory.mktemp("mhpo-spool"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
