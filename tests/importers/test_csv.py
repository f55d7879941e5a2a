"""`mhpo import csv`: one run per file or per run column, every numeric column a key; bad files refused
whole with the line and the fix; re-import stores nothing twice and an interrupted import resumes."""

from __future__ import annotations

import csv
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mhpo.importers import Writer, read_csv
from mhpo.importers._writer import chunks, run_id_for
from tests.fixtures.server import LiveServer
from tests.importers.conftest import Api, run_import


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def wandb_export(path: Path) -> Path:
    """W&B's CSV shape: _step, _timestamp, blank cells where a key was not logged, a text column, NaN and inf."""
    rows: list[list[object]] = []
    for step in range(40):
        entropy: object = "nan" if step == 30 else 2.0 - step / 40
        grad: object = "inf" if step == 35 else ("" if step % 2 else 0.5)
        rows.append([step, 1_700_000_000 + step, entropy, grad, "run-note"])
    return write_csv(path, ["_step", "_timestamp", "actor/entropy", "actor/grad_norm", "Name"], rows)


def test_a_wandb_export_imports_with_flags(
    tmp_path: Path, migrated: str, api_on, capsys: pytest.CaptureFixture[str]
) -> None:
    path = wandb_export(tmp_path / "verl-run.csv")
    code, out, err = run_import(
        "csv", str(path), "--step-column", "_step", "--time-column", "_timestamp", "--project", "verl",
        "--db", migrated, capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "imported 1 runs, 61 points" in out and "skipped text columns: Name" in out
    api = api_on(migrated)
    [run] = api.runs("verl")
    assert run["name"] == "verl-run" and run["last_step"] == 39
    entropy = api.series(run["run_id"], "policy/entropy")  # verl's actor/entropy, mapped
    assert entropy["step"] == list(range(40)) and math.isnan(entropy["value"][30])
    grad = api.series(run["run_id"], "grad/norm")
    assert grad["step"] == [*range(0, 35, 2), 35, *range(36, 40, 2)] and math.isinf(grad["value"][18])
    kinds = {(e["kind"], e["step"]) for e in api.events(run["run_id"])}
    assert {("non_finite", 30), ("non_finite", 35)} <= kinds


def test_run_column_makes_one_run_per_value(
    tmp_path: Path, sqlite_url: str, api_on, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [[run, step, step * 0.1] for run in ("mhpo", "grpo") for step in range(5)]
    path = write_csv(tmp_path / "runs.csv", ["run", "step", "loss"], rows)
    code, _, err = run_import("csv", str(path), "--run-column", "run", "--db", sqlite_url, capsys=capsys)
    assert code == 0, err
    runs = {r["name"]: r for r in api_on(sqlite_url).runs("runs")}
    assert set(runs) == {"mhpo", "grpo"} and {r["last_step"] for r in runs.values()} == {4}


@pytest.mark.parametrize(
    ("header", "rows", "args", "message"),
    [
        (["_step", "loss"], [[0, 1.0]], [], "line 1 has no column 'step' (columns: _step, loss); pass --step-column"),
        (["step", "loss"], [[0, 1.0], [1, "oops"], [2, 0.5]], [], "line 3, column 'loss': 'oops' is not a number"),
        (["step", "loss"], [[0, 1.0], ["1.5", 1.0]], [], "line 3, column 'step': step '1.5' is not a whole number"),
        (["step", "loss"], [[0, 1.0], [-1, 1.0]], [], "line 3: step -1 is outside"),
        (["step", "loss"], [[0, 1.0], [1, 2.0, 3.0]], [], "line 3 has 3 cells, the header 2"),
        (["step", "loss"], [[0, 1.0]], ["--run-column", "who"], "line 1 has no column 'who'"),
        (["step", "loss"], [[0, 1.0]], ["--project", "tab\there"], "project 'tab\\there' cannot name a project"),
    ],
    ids=[
        "missing-step-column",
        "text-cell",
        "fractional-step",
        "negative-step",
        "ragged-row",
        "missing-run-column",
        "bad-project",
    ],
)
def test_bad_files_are_refused_whole_naming_the_line(
    tmp_path: Path, sqlite_url: str, api_on, capsys: pytest.CaptureFixture[str], header, rows, args, message
) -> None:
    path = write_csv(tmp_path / "bad.csv", header, rows)
    code, out, err = run_import("csv", str(path), *args, "--db", sqlite_url, capsys=capsys)
    assert code == 2 and out == ""
    assert f"{path}: " in err and message in err
    assert api_on(sqlite_url).runs("bad") == []  # nothing half-imported


def test_reimport_stores_nothing_twice_and_an_interrupted_import_resumes(
    tmp_path: Path, live_server: LiveServer
) -> None:
    """The first two batches were accepted before the import died; the re-run sends them again (answered
    as duplicates, so nothing is stored twice) and then the rest."""
    rows = [[step, 1.0 + (step % 7) * 0.01, 0.5] for step in range(25_000)]
    path = write_csv(tmp_path / "long.csv", ["step", "entropy", "loss"], rows)
    [run] = read_csv(path, project="resume")
    batches = list(chunks(run.records))
    assert len(batches) > 3
    interrupted = [record for batch in batches[:2] for record in batch]
    writer = Writer(live_server.url)
    try:
        partial = writer.write(type(run)(**{**run.__dict__, "records": interrupted}))
    finally:
        writer.close()
    assert partial.accepted > 0

    done = subprocess.run(
        [sys.executable, "-m", "mhpo", "import", "csv", str(path), "--project", "resume", "--server", live_server.url],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    total = 4 * 25_000  # entropy, loss and their product keys policy/entropy, train/loss
    assert f"{total - partial.accepted} items stored (product keys included), {partial.accepted} already there" in (
        done.stdout
    )
    api = Api(live_server.url)
    [stored] = api.runs("resume")
    assert stored["run_id"] == run_id_for(run) and stored["last_step"] == 24_999
    first = api.get(f"/api/v1/runs/{stored['run_id']}/scalars", keys="policy/entropy", end=9_999, max_points=10_000)
    assert not first["downsampled"] and first["series"]["policy/entropy"]["step"] == list(range(10_000))
    again = subprocess.run(
        [sys.executable, "-m", "mhpo", "import", "csv", str(path), "--project", "resume", "--server", live_server.url],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert f"0 items stored (product keys included), {total} already there" in again.stdout, again.stderr


@pytest.mark.postgres
def test_an_unmigrated_postgres_database_is_refused_with_the_fix(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "run.csv", ["step", "loss"], [[0, 1.0]])
    code, out, err = run_import("csv", str(path), "--db", pg_url, capsys=capsys)
    assert code == 1 and out == ""
    assert "not migrated" in err and "mhpo db upgrade" in err


def test_an_import_killed_midway_resumes_where_it_stopped(tmp_path: Path, live_server: LiveServer) -> None:
    """The importer process is killed (SIGKILL) once the server holds its first batch; the same command
    again stores the rest and nothing twice."""
    steps = 100_000
    path = write_csv(tmp_path / "long.csv", ["step", "entropy", "loss"], [[s, 1.0, 0.5] for s in range(steps)])
    command = [sys.executable, "-m", "mhpo", "import", "csv", str(path), "--project", "kill", "--no-progress"]
    command += ["--server", live_server.url]
    api = Api(live_server.url)
    importer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while importer.poll() is None:
            runs = api.runs("kill")
            if runs and runs[0]["last_step"] is not None:
                importer.kill()
                break
            time.sleep(0.01)
    finally:
        importer.kill()
        importer.wait()
    assert importer.returncode == -signal.SIGKILL, "the import finished before it could be interrupted"
    [run] = api.runs("kill")
    assert 0 <= run["last_step"] < steps - 1

    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    stored, already = (
        int(n) for n in re.findall(r"(\d+) items stored \(product keys included\), (\d+) already", done.stdout)[0]
    )
    assert stored > 0 and already > 0 and stored + already == 4 * steps
    [run] = api.runs("kill")
    assert run["last_step"] == steps - 1
    head = api.get(f"/api/v1/runs/{run['run_id']}/scalars", keys="entropy", end=9_999, max_points=10_000)
    assert head["series"]["entropy"]["step"] == list(range(10_000))
