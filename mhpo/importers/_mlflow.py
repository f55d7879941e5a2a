"""An MLflow tracking store (file store, database or tracking server) -> runs, through the `mlflow` client.

Experiment = project (unless `--project` is given), MLflow run = run with its params (the run's
config), tags (under "mlflow.tags", as the MLflow-compatible endpoint keeps them), status and the
full history of every metric (`MlflowClient.get_metric_history`, which pages through a server's
answers). A metric logged twice at one step keeps its latest value. MLflow 3 keeps its file store
(`./mlruns`) in maintenance mode behind `MLFLOW_ALLOW_FILE_STORE=true`; the importer sets it for a
file store it reads (unless it is set already), since moving old runs out of one is its purpose.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from mhpo.importers._model import SourceError, SourceRun, build_records, check_key, check_step, wall_time

TAGS = "mlflow.tags"  # where the MLflow endpoint keeps a run's tags in its config
STATUS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "failed", "RUNNING": "running", "SCHEDULED": "running"}
PAGE = 1000
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"


def _paged(fetch: Any) -> list[Any]:
    """Every item of an MLflow search, page after page."""
    items: list[Any] = []
    token = None
    while True:
        page = fetch(token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def read_tracking(
    tracking_uri: str, experiment: str | None = None, project: str | None = None, name: str | None = None
) -> list[SourceRun]:
    """Every run of `experiment` (default: of every experiment) as a SourceRun."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        # MLflow 3 refuses file stores unless told otherwise; reading an existing one is what an import is for.
        os.environ.setdefault(ALLOW_FILE_STORE, "true")
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        if experiment is None:
            experiments = _paged(lambda token: client.search_experiments(max_results=PAGE, page_token=token))
        else:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                names = [e.name for e in client.search_experiments(max_results=PAGE)]
                raise SourceError(
                    f"{tracking_uri}: no experiment named {experiment!r}; experiments there: {', '.join(names) or 'none'}"
                )
            experiments = [found]
        runs: list[tuple[Any, Any]] = []
        for exp in experiments:
            found_runs = _paged(
                lambda token, eid=exp.experiment_id: client.search_runs(
                    [eid], max_results=PAGE, order_by=["attributes.start_time ASC"], page_token=token
                )
            )
            runs.extend((exp, run) for run in found_runs)
        if name is not None and len(runs) != 1:
            raise SourceError(
                f"{tracking_uri}: --name {name!r} names one run, but {len(runs)} runs were found: drop --name "
                "(each run keeps its MLflow name) or pick one experiment holding one run with --experiment"
            )
        return [_read_run(client, tracking_uri, exp, run, project, name) for exp, run in runs]
    except MlflowException as exc:
        raise SourceError(f"{tracking_uri}: the MLflow client failed: {exc.message}; check --tracking-uri") from None


def _read_run(client: Any, uri: str, exp: Any, run: Any, project: str | None, name: str | None) -> SourceRun:
    run_id = run.info.run_id
    scalars: dict[int, dict[str, float]] = defaultdict(dict)
    times: dict[int, float] = {}
    latest: dict[tuple[int, str], int] = {}
    for key in sorted(run.data.metrics):
        where = f"{uri}: run {run_id} metric {key!r}"
        check_key(key, where)
        for metric in client.get_metric_history(run_id, key):
            step = int(metric.step)
            check_step(step, where)
            stamp = int(metric.timestamp or 0)
            if latest.get((step, key), -1) > stamp:
                continue
            latest[step, key] = stamp
            scalars[step][key] = float(metric.value)
            seconds = wall_time(stamp / 1000.0)
            if seconds is not None:
                times[step] = max(times.get(step, 0.0), seconds)
    config: dict[str, Any] = dict(run.data.params)
    tags = dict(run.data.tags)
    if tags:
        config[TAGS] = tags
    return SourceRun(
        project=project or exp.name,
        name=name or run.info.run_name or run_id,
        source=f"mlflow:{uri}#{run_id}",
        format="mlflow",
        config=config,
        records=build_records(scalars, times),
        status=STATUS.get(run.info.status, "finished"),
        points=sum(len(values) for values in scalars.values()),
    )
