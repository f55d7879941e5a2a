"""The docs' code runs: every ```python block of the docs pages and the README, so no example rots.

A page's blocks run in order in one namespace (a later block may use what an earlier one
made), in a fresh working directory, with `MHPO_SERVER` pointing at a real `mhpo serve` on a
loopback port and the client's spool in the test's tmp dir. A block that cannot run (one
that serves forever, say) is preceded by the HTML comment `<!-- docs-test: skip (why) -->`,
which the site does not show; `test_few_blocks_are_skipped` keeps those rare.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from markdown_it import MarkdownIt

from tests.fixtures.server import LiveServer

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "README.md"]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b.*-->")
MAX_SKIPPED = 3


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skipped: bool


def python_blocks(page: Path) -> list[Block]:
    """The page's fenced python blocks, each marked skipped when a skip comment precedes it."""
    blocks, previous = [], None
    for token in MarkdownIt("commonmark").parse(page.read_text()):
        if token.type == "fence" and token.info.split()[:1] == ["python"] and token.map is not None:
            skipped = previous is not None and previous.type == "html_block" and bool(SKIP.search(previous.content))
            blocks.append(Block(page, token.map[0] + 1, token.content, skipped))
        if token.block and token.nesting >= 0:
            previous = token
    return blocks


def page_id(page: Path) -> str:
    return page.relative_to(REPO_ROOT).as_posix()


RUNNABLE = [page for page in PAGES if any(not b.skipped for b in python_blocks(page))]


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for every page (a fresh SQLite file, auth off): the pages use distinct projects."""
    with LiveServer(f"sqlite:///{tmp_path_factory.mktemp('docs-db') / 'mhpo.db'}") as server:
        yield server


def runs_of(server: LiveServer, project: str) -> list[dict]:
    return httpx.get(f"{server.url}/api/v1/runs", params={"project": project}, timeout=10).json()["runs"]


def check_trl(server: LiveServer) -> None:
    """The TRL script streamed a finished run with the diagnostics and TRL's own metrics."""
    runs = runs_of(server, "trl-tiny")
    assert len(runs) == 1 and runs[0]["status"] == "finished", runs
    keys = httpx.get(f"{server.url}/api/v1/runs/{runs[0]['run_id']}/keys", timeout=10).json()
    assert {"ratio/std", "hazard/zeta_mean", "train/update_index", "reward"} <= set(keys["scalars"]), keys
    assert "log_ratio" in keys["histograms"], keys


def check_client(server: LiveServer) -> None:
    """The resumed run ends at step 5 with the rewound steps replaced; the fork holds 0..5."""
    runs = {r["name"]: r for r in runs_of(server, "grpo-math")}
    assert runs["mhpo-c1.5"]["last_step"] == 5 and runs["mhpo-c1.5-branch"]["fork_step"] == 4, runs
    assert runs["mhpo-c1.5-branch"]["last_step"] == 5
    assert [r["status"] for r in runs_of(server, "custom-loop")] == ["finished"]


def check_import(project: str, flagged_step: int | None) -> Callable[[LiveServer], None]:
    """The page's `mhpo import` made one finished run, with `non_finite` at `flagged_step` (or none)."""

    def check(server: LiveServer) -> None:
        [run] = runs_of(server, project)
        assert run["status"] == "finished", run
        events = httpx.get(f"{server.url}/api/v1/runs/{run['run_id']}/events", timeout=10).json()["events"]
        flagged = [e["step"] for e in events if e["kind"] == "non_finite"]
        assert flagged == ([] if flagged_step is None else [flagged_step]), events

    return check


CHECKS: dict[str, Callable[[LiveServer], None]] = {
    "docs/trl.md": check_trl,
    "docs/client.md": check_client,
    "docs/import-tensorboard.md": check_import("tb-demo", 30),
    "docs/import-mlflow.md": check_import("grpo-demo", None),
    "docs/import-csv.md": check_import("csv-demo", 30),
}


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_page_code_runs(page: Path, docs_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "MHPO_SERVER": docs_server.url,
        "MHPO_SPOOL_DIR": str(tmp_path / "spool"),
        "MHPO_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in python_blocks(page):
        if not block.skipped:
            # compiled under the page's name and line, so a traceback points into the doc
            code = compile("\n" * block.line + block.code, str(page), "exec")
            exec(code, namespace)
    check = CHECKS.get(page_id(page))
    if check is not None:
        check(docs_server)


def test_the_collector_finds_the_examples() -> None:
    """Guards the collector itself: the pages known to hold examples are collected, fences with
    another language are not, and a skip comment marks only the block right after it."""
    assert {"docs/trl.md", "docs/client.md", "docs/losses.md", "docs/diagnostics.md"} <= {page_id(p) for p in RUNNABLE}
    dashboard = python_blocks(REPO_ROOT / "docs" / "dashboard.md")
    assert [b.skipped for b in dashboard] == [True]
    assert all(b.code.strip() for page in PAGES for b in python_blocks(page))


def test_few_blocks_are_skipped() -> None:
    skipped = [f"{page_id(b.page)}:{b.line}" for page in PAGES for b in python_blocks(page) if b.skipped]
    assert len(skipped) <= MAX_SKIPPED, f"{skipped}: make these examples runnable instead of skipping them"
