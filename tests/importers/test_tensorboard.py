"""`mhpo import tensorboard`: a logdir written by a real TRL GRPOTrainer (report_to="tensorboard") and by
torch's SummaryWriter, imported through the records API with TRL's names mapped and flags computed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from tests.fixtures.server import LiveServer
from tests.importers.conftest import run_import


def trl_run_with_nan(trl_logdir: Path, tmp_path: Path) -> tuple[Path, int]:
    """A copy of the TRL logdir where the run went on one more step and its entropy turned NaN (a second event
    file, as a resumed trainer writes), so the import must raise `non_finite` on the mapped key."""
    logdir = tmp_path / "logs"
    shutil.copytree(trl_logdir, logdir)
    nan_step = 4
    with SummaryWriter(str(logdir / "grpo-run"), filename_suffix=".resumed") as writer:
        writer.add_scalar("train/entropy", float("nan"), nan_step)
        writer.add_scalar("train/loss", 0.1, nan_step)
    return logdir, nan_step


def test_trl_logdir_imports_with_trl_names_mapped_and_flags(
    trl_logdir: Path, tmp_path: Path, migrated: str, api_on, capsys: pytest.CaptureFixture[str]
) -> None:
    logdir, nan_step = trl_run_with_nan(trl_logdir, tmp_path)
    code, out, err = run_import("tensorboard", str(logdir), "--db", migrated, "--project", "trl-tb", capsys=capsys)
    assert code == 0, err
    assert "imported 1 runs" in out and "non_finite x1" in out

    api = api_on(migrated)
    [run] = api.runs("trl-tb")
    assert run["name"] == "grpo-run" and run["status"] == "finished"
    assert run["config"]["mhpo.import"]["format"] == "tensorboard"
    keys = set(api.get(f"/api/v1/runs/{run['run_id']}/keys")["scalars"])
    # transformers' TensorBoard callback writes TRL's keys under train/; originals kept, product keys added
    assert {"train/entropy", "policy/entropy", "train/grad_norm", "grad/norm", "train/reward", "reward/mean"} <= keys
    assert {"train/frac_reward_zero_std", "group/degenerate_frac", "train/learning_rate", "train/lr"} <= keys
    entropy = api.series(run["run_id"], "policy/entropy")
    original = api.series(run["run_id"], "train/entropy")
    assert entropy["step"] == original["step"] == [1, 2, 3, nan_step]
    assert entropy["value"][:3] == original["value"][:3] and all(v > 0 for v in entropy["value"][:3])
    assert np.isnan(entropy["value"][3])

    flags = [e for e in api.events(run["run_id"]) if e["kind"] == "non_finite"]
    assert [f["step"] for f in flags] == [nan_step]
    assert {"policy/entropy", "train/entropy"} <= set(flags[0]["evidence"]["values"])


def test_reimport_through_a_server_stores_nothing_twice(
    trl_logdir: Path, tmp_path: Path, live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.importers.conftest import Api

    logdir, _ = trl_run_with_nan(trl_logdir, tmp_path)
    args = ("tensorboard", str(logdir), "--server", live_server.url, "--project", "p", "--name", "mine")
    code, first, err = run_import(*args, capsys=capsys)
    assert code == 0, err
    code, second, err = run_import(*args, capsys=capsys)
    assert code == 0, err
    stored = int(first.split("points; ")[1].split(" items stored")[0])
    assert stored > 0 and f"0 items stored (product keys included), {stored} already there" in second
    api = Api(live_server.url)
    [run] = api.runs("p")  # found again by its name and source, not created twice
    assert run["name"] == "mine"
    assert len([e for e in api.events(run["run_id"]) if e["kind"] == "non_finite"]) == 1


def test_histograms_exact_when_the_bins_allow_else_generic(
    tmp_path: Path, sqlite_url: str, api_on, capsys: pytest.CaptureFixture[str]
) -> None:
    logdir = tmp_path / "logs"
    edges = np.linspace(-2.0, 2.0, 17)  # 16 uniform buckets, the same at every step
    rng = np.random.default_rng(0)
    with SummaryWriter(str(logdir / "run")) as writer:
        for step in range(3):
            values = rng.normal(0, 0.5, 1000)
            counts, _ = np.histogram(values, bins=edges)
            writer.add_histogram_raw(
                "log_ratio",
                min=float(edges[0]),
                max=float(edges[-1]),
                num=int(counts.sum()),
                sum=float(values.sum()),
                sum_squares=float((values**2).sum()),
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=step,
            )
            writer.add_histogram("weights", values * (step + 1), step)  # edges follow each step's data
            writer.add_scalar("loss", 1.0 / (step + 1), step)
    code, out, err = run_import("tensorboard", str(logdir), "--db", sqlite_url, capsys=capsys)
    assert code == 0, err
    assert "histogram 'weights': buckets differ between steps, kept as a generic 64-bin histogram" in out
    api = api_on(sqlite_url)
    [run] = api.runs("logs")
    exact = api.get(f"/api/v1/runs/{run['run_id']}/histograms/log_ratio")
    assert (exact["lo"], exact["hi"], exact["bins"]) == (-2.0, 2.0, 16)
    assert exact["step"] == [0, 1, 2] and all(sum(c) == 1000 for c in exact["counts"])
    generic = api.get(f"/api/v1/runs/{run['run_id']}/histograms/weights")
    assert generic["bins"] == 64 and generic["step"] == [0, 1, 2]
    assert all(sum(c) == 1000 for c in generic["counts"])
    assert generic["lo"] <= min(generic["min"]) and generic["hi"] >= max(generic["max"])


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_event_file_names_the_file_and_record_and_imports_nothing(
    tmp_path: Path, sqlite_url: str, api_on, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    logdir = tmp_path / "logs"
    with SummaryWriter(str(logdir / "good")) as writer:
        for step in range(50):
            writer.add_scalar("loss", 1.0, step)
    with SummaryWriter(str(logdir / "bad")) as writer:
        for step in range(50):
            writer.add_scalar("loss", 1.0, step)
    [path] = (logdir / "bad").glob("*tfevents*")
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:-7]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    code, out, err = run_import("tensorboard", str(logdir), "--db", sqlite_url, capsys=capsys)
    assert code == 2 and out == ""
    assert str(path) in err and "record " in err and "damaged" in err and "Move the file out" in err
    assert api_on(sqlite_url).runs("logs") == []  # not even the good run: nothing half-imported


def test_errors_name_the_logdir(tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_import("tensorboard", str(tmp_path / "nowhere"), "--db", sqlite_url, capsys=capsys)
    assert code == 2 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_import("tensorboard", str(tmp_path / "empty"), "--db", sqlite_url, capsys=capsys)
    assert code == 2 and "holds no TensorBoard event files" in err


def test_run_directories_read_in_parallel_give_the_same_runs_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mhpo.importers import SourceError, _tensorboard, read_logdir

    logdir = tmp_path / "sweep"
    for run in range(3):
        with SummaryWriter(str(logdir / f"lr-{run}")) as writer:
            for step in range(20):
                writer.add_scalar("train/entropy", 1.0 / (run + 1), step)
    serial = read_logdir(logdir)
    monkeypatch.setattr(_tensorboard, "PARALLEL_BYTES", 0)  # a small logdir through the process pool
    parallel = read_logdir(logdir)
    assert [(r.name, r.records) for r in parallel] == [(r.name, r.records) for r in serial]
    assert [r.name for r in parallel] == ["lr-0", "lr-1", "lr-2"]
    [path] = (logdir / "lr-1").glob("*tfevents*")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(SourceError, match="record 20 is damaged"):
        read_logdir(logdir)
