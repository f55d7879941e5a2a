"""`mhpo import tensorboard|mlflow|csv ...`: bring runs logged elsewhere in, with flags computed on them.

Every source is read and checked whole before its first point is sent, then each run goes
through the service's records API (`--server`, default $MHPO_SERVER with $MHPO_TOKEN), or through
the same app started in this process on a database (`--db URL`). The summary lists each run
with its points, what was new, and the flags raised on it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from mhpo.importers._model import SourceError, SourceRun, check_names
from mhpo.importers._writer import ImportFailed, RunResult, Writer, items

DEFAULT_SERVER = "http://127.0.0.1:8765"
IMPORT_EXTRA = ("tensorboard", "google_crc32c", "mlflow", "tqdm")  # the packages of `mhpo[import]`


def _common(parser: argparse.ArgumentParser, one_run_name: bool = True) -> None:
    parser.add_argument("--project", help="project of the imported runs (default: named after the source)")
    if one_run_name:
        parser.add_argument("--name", help="run name, when the source holds one run (default: from the source)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", help="the service's URL (default: $MHPO_SERVER, else " + DEFAULT_SERVER + ")")
    where.add_argument(
        "--db", help="write into this database (SQLAlchemy URL) through the service started in this process"
    )
    parser.add_argument("--token", help="write token for --server (default: $MHPO_TOKEN)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="mhpo import",
        description="Import runs logged with TensorBoard, MLflow or as CSV; flags and alert rules run on them "
        "as if they had been streamed. Re-running an import stores nothing twice and resumes an interrupted one.",
    )
    sub = top.add_subparsers(dest="source", required=True)
    tb = sub.add_parser("tensorboard", help="TensorBoard logdirs (TRL, transformers, verl, OpenRLHF)")
    tb.add_argument("logdirs", nargs="+", type=Path, metavar="LOGDIR", help="each directory with event files is a run")
    _common(tb)
    ml = sub.add_parser("mlflow", help="an MLflow tracking store: file store, database or tracking server")
    ml.add_argument("--tracking-uri", required=True, help="e.g. ./mlruns, sqlite:///mlflow.db, http://host:5000")
    ml.add_argument("--experiment", help="only this experiment's runs (default: every experiment)")
    _common(ml)
    cs = sub.add_parser("csv", help="a CSV export (W&B, trackio, pandas): one row per step")
    cs.add_argument("file", type=Path, metavar="FILE")
    cs.add_argument("--step-column", default="step", help="column holding the step (default: step)")
    cs.add_argument("--run-column", help="column naming the run of each row: one run per value")
    cs.add_argument("--time-column", help="column holding each step's unix time in seconds (W&B: _timestamp)")
    _common(cs)
    return top


def read(args: argparse.Namespace) -> list[SourceRun]:
    """Every run of the source, read and checked whole (nothing is sent yet)."""
    if args.source == "tensorboard":
        from mhpo.importers._tensorboard import read_logdir

        if args.name is not None and len(args.logdirs) > 1:
            raise SourceError("--name names one run, but several LOGDIRs were given: drop --name")
        return [run for logdir in args.logdirs for run in read_logdir(logdir, args.project, args.name)]
    if args.source == "mlflow":
        from mhpo.importers._mlflow import read_tracking

        uri = args.tracking_uri
        if "://" not in uri and not uri.startswith("file:") and Path(uri).exists():
            uri = Path(uri).resolve().as_uri()  # a path: the same store gives the same source tag from anywhere
        return read_tracking(uri, args.experiment, args.project, args.name)
    from mhpo.importers._csv import read_csv

    return read_csv(args.file, args.step_column, args.run_column, args.time_column, args.project, args.name)


@contextmanager
def destination(args: argparse.Namespace) -> Iterator[tuple[str, str | None, str]]:
    """(base URL, token, what to call it) of the service to write to: the given server, or one started on --db."""
    if args.db is None:
        url = args.server or os.environ.get("MHPO_SERVER") or DEFAULT_SERVER
        yield url, args.token or os.environ.get("MHPO_TOKEN"), url
        return
    from sqlalchemy import make_url

    from mhpo_server.app import ConfigError  # the service's app, only for --db
    from mhpo_server.local import serving
    from mhpo_server.store import SchemaError

    with ExitStack() as stack:
        try:
            url = stack.enter_context(serving(args.db))
        except (SchemaError, ConfigError) as exc:
            raise ImportFailed(str(exc)) from None
        yield url, None, make_url(args.db).render_as_string(hide_password=True)


def main(command: str, argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    try:
        from tqdm import tqdm

        runs = read(args)
        for run in runs:
            check_names(run)
    except SourceError as exc:
        print(f"mhpo import {args.source}: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        package = (exc.name or "").split(".")[0]
        if package not in IMPORT_EXTRA:
            raise
        print(f"mhpo import {args.source}: needs the {package} package: pip install 'mhpo[import]'", file=sys.stderr)
        return 2
    total = sum(run.points for run in runs)
    results: list[RunResult] = []
    try:
        with (
            destination(args) as (url, token, label),
            tqdm(
                total=sum(items(run.records) for run in runs),
                unit="pt",
                unit_scale=True,
                disable=args.no_progress or None,
            ) as bar,
        ):
            writer = Writer(url, token)
            try:
                for run in runs:
                    bar.set_description(f"{run.project}/{run.name}"[:40])
                    results.append(writer.write(run, bar.update))
            finally:
                writer.close()
    except ImportFailed as exc:
        print(f"mhpo import {args.source}: {exc}", file=sys.stderr)
        return 1
    print(summary(results, total, label))
    return 0


def summary(results: list[RunResult], points: int, url: str) -> str:
    """Runs, points, what was new, and the flags raised on each run."""
    lines = []
    flags: Counter[str] = Counter()
    for r in results:
        flags.update(r.flags)
        raised = ", ".join(f"{kind} x{n}" for kind, n in sorted(r.flags.items())) or "none"
        lines.append(
            f"  {r.project}/{r.name} ({r.run_id}): {r.points} points; {r.accepted} items stored (product keys included), "
            f"{r.duplicates} already there; flags: {raised}"
        )
        lines += [f"    note: {note}" for note in r.notes]
    raised = ", ".join(f"{kind} x{n}" for kind, n in sorted(flags.items())) or "none"
    head = f"imported {len(results)} runs, {points} points into {url}; flags raised: {raised}"
    return "\n".join([head, *lines])
