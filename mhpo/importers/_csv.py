"""A CSV export (W&B's "Download CSV", trackio's, pandas' `to_csv`) -> runs, read with the stdlib `csv` module.

One row per step: `--step-column` holds the step (an integer; "12.0" is 12), every other column
whose cells are numbers is a metric. Empty cells are steps where that metric was not logged.
"nan", "inf", "-inf", "Infinity" are numbers (non-finite values are imported as values, and the
`non_finite` flag marks them); a column whose cells are all text (a run's name, a note) is
skipped and named in the summary, but a text cell in a numeric column is an error naming its
line. With `--run-column` the rows are grouped into one run per value of that column.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from mhpo.importers._model import SourceError, SourceRun, build_records, check_key, check_step, wall_time


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def read_csv(
    path: Path,
    step_column: str = "step",
    run_column: str | None = None,
    time_column: str | None = None,
    project: str | None = None,
    name: str | None = None,
) -> list[SourceRun]:
    """The runs of one CSV file; nothing is returned unless the whole file is valid."""
    path = path.resolve()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise SourceError(f"{path}: the file is empty; export the run's history with a header row")
            rows = [(reader.line_num, row) for row in reader]
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise SourceError(f"{path}: not a readable CSV ({exc}); check the quoting of that line") from None
    columns = {column: i for i, column in enumerate(header)}
    for option, column in (
        ("--step-column", step_column),
        ("--run-column", run_column),
        ("--time-column", time_column),
    ):
        if column is not None and column not in columns:
            raise SourceError(
                f"{path}: line 1 has no column {column!r} (columns: {', '.join(header)}); pass {option} with one of them"
            )
    special = {step_column, run_column, time_column}
    metrics = [c for c in header if c not in special]
    numeric, text = _classify(path, header, rows, metrics)
    for column in numeric:
        check_key(column, f"{path}: line 1, column {column!r}")
    grouped: dict[str, list[tuple[int, list[str]]]] = defaultdict(list)
    for line, row in rows:
        if len(row) != len(header):
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            raise SourceError(
                f"{path}: line {line} has {len(row)} cells, the header {len(header)}: fix the row (a missing "
                "separator, or an unquoted comma inside a value)"
            )
        grouped[row[columns[run_column]] if run_column else ""].append((line, row))
    if name is not None and len(grouped) > 1:
        raise SourceError(
            f"{path}: --name {name!r} names one run, but column {run_column!r} holds {len(grouped)} runs: drop --name"
        )
    runs = []
    for group, group_rows in grouped.items():
        run_name = name or group or path.stem
        runs.append(
            _run(path, group_rows, columns, numeric, step_column, time_column, project or path.stem, run_name, group)
        )
        if text:
            runs[-1].notes.append(f"skipped text columns: {', '.join(text)}")
    return runs


def _classify(path: Path, header: list[str], rows: list[tuple[int, list[str]]], metrics: list[str]) -> Any:
    """(numeric columns, text columns); a numeric column holding a text cell is an error naming the line."""
    index = {c: header.index(c) for c in metrics}
    numeric, text = [], []
    for column in metrics:
        cells = [(line, row[index[column]].strip()) for line, row in rows if len(row) == len(header)]
        filled = [(line, cell) for line, cell in cells if cell]
        bad = [(line, cell) for line, cell in filled if _number(cell) is None]
        if filled and len(bad) == len(filled):
            text.append(column)
            continue
        if bad:
            line, cell = bad[0]
            raise SourceError(
                f"{path}: line {line}, column {column!r}: {cell[:40]!r} is not a number (the column's other cells "
                "are): fix the cell, or empty it if the metric was not logged at that step"
            )
        numeric.append(column)
    return numeric, text


def _run(
    path: Path,
    rows: list[tuple[int, list[str]]],
    columns: dict[str, int],
    numeric: list[str],
    step_column: str,
    time_column: str | None,
    project: str,
    name: str,
    group: str,
) -> SourceRun:
    scalars: dict[int, dict[str, float]] = defaultdict(dict)
    times: dict[int, float] = {}
    step_at = columns[step_column]
    metric_at = [(column, columns[column]) for column in numeric]
    for line, row in rows:
        where = f"{path}: line {line}"
        cell = row[step_at].strip()
        value = _number(cell)
        if value is None or not math.isfinite(value) or value != int(value):
            raise SourceError(
                f"{where}, column {step_column!r}: step {cell[:40]!r} is not a whole number: fix the cell, or pass "
                "--step-column naming the column that holds the steps"
            )
        step = int(value)
        check_step(step, where)
        values = scalars[step]
        for column, i in metric_at:
            text = row[i].strip()
            if text:
                values[column] = float(text)
        if time_column is not None:
            stamp = _number(row[columns[time_column]].strip())
            seconds = wall_time(stamp) if stamp is not None else None
            if seconds is None:
                raise SourceError(
                    f"{where}, column {time_column!r}: {row[columns[time_column]][:40]!r} is not a unix time in "
                    "seconds: fix the cell or leave out --time-column"
                )
            times[step] = seconds
    source = f"csv:{path}" + (f"#{group}" if group else "")
    return SourceRun(
        project=project,
        name=name,
        source=source,
        format="csv",
        config={"file": str(path), **({"run": group} if group else {})},
        records=build_records(scalars, times),
        points=sum(len(v) for v in scalars.values()),
    )
