"""The part of MLflow's tracking REST API (`/api/2.0/mlflow/...`) the `mlflow` client uses to log a run.

With `MLFLOW_TRACKING_URI` pointed at `mhpo serve`, any MLflow logger (transformers'
`MLflowCallback`, so TRL's `report_to="mlflow"`; verl's `trainer.logger=['mlflow']`; Lightning)
streams into MHPO Monitor with flags and alerts. Experiment = project (its id is the project
name; MLflow's default experiment "0" is the project "Default"), MLflow run = run, params and
tags = the run's config (tags under "mlflow.tags"). Metrics are stored under their own names
and, for TRL / verl / transformers names, under the product's keys too
(`mhpo.integrations.names`). MLflow's `step` is the step; timestamps are milliseconds.
Errors answer in MLflow's shape, `{"error_code": ..., "message": ...}`; auth is the product's
(`MLFLOW_TRACKING_TOKEN` is sent as a Bearer token).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    model_validator,
)
from sqlalchemy.exc import DataError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mhpo.integrations.names import product_scalars
from mhpo_server.config import Settings
from mhpo_server.deps import (
    IngestDep,
    MetricsDep,
    Principal,
    ReadAccess,
    SettingsDep,
    StoreDep,
    WriteAccess,
    visible_run,
)
from mhpo_server.ingest import Ingest
from mhpo_server.routes.series import CLIENT_GONE, client_gone
from mhpo_server.schemas import (
    MAX_STEP,
    Key,
    Name,
    RecordIn,
    RunCreate,
    Text,
    clean_config,
    config_too_large,
    unstorable,
)
from mhpo_server.schemas import Run as RunOut
from mhpo_server.store import DATA_ERROR, Conflict, Invalid, NotFound, OverLimit, Store

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = ("0", "Default")
STATUS = {"RUNNING": "running", "SCHEDULED": "running", "FINISHED": "finished", "FAILED": "failed", "KILLED": "failed"}
MLFLOW_STATUS = {"running": "RUNNING", "finished": "FINISHED", "failed": "FAILED", "crashed": "FAILED"}
TAGS = "mlflow.tags"
IGNORED_HEADER = "MHPO-Ignored-Metrics"
# Runs whose `data.metrics` hold only their first MHPO_MAX_KEYS_PER_READ keys (runs/get, runs/search).
TRUNCATED_HEADER = "MHPO-Truncated-Metrics"


class MLflowError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error(status: int, code: str, message: str) -> JSONResponse:
    # A lone surrogate echoed from the request has no UTF-8 encoding: escape it rather than fail.
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error_code": code, "message": text}, status_code=status)


def invalid(errors: list[Any]) -> str:
    """Each bad field by its path and why (never the value: it may be text that cannot be encoded)."""
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query")]
        ctx = e.get("ctx") or {}
        if e.get("type") == "too_long" and "actual_length" in ctx:  # a list over MLflow's per-request limit
            why = f"{ctx['actual_length']} items exceed MLflow's limit of {ctx['max_length']} per request; split the batch"
        else:
            why = e.get("msg", "")
        parts.append(f"{'.'.join(loc) or 'body'}: {why}")
    return "; ".join(parts)


class MLflowRoute(APIRoute):
    """Answers every failure of these routes (auth, validation, store) in MLflow's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except MLflowError as e:
                return error(e.status, e.code, e.message)
            except StarletteHTTPException as e:  # also FastAPI's own, e.g. a body that is not UTF-8
                code = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "RESOURCE_DOES_NOT_EXIST"}
                response = error(e.status_code, code.get(e.status_code, "INVALID_PARAMETER_VALUE"), str(e.detail))
                response.headers.update(e.headers or {})
                return response
            except (RequestValidationError, ValidationError) as e:
                return error(400, "INVALID_PARAMETER_VALUE", invalid(list(e.errors())))
            except Invalid as e:
                return error(400, "INVALID_PARAMETER_VALUE", f"{'.'.join(map(str, e.loc))}: {e.message}")
            except OverLimit as e:
                return error(400, "INVALID_PARAMETER_VALUE", e.message)
            except DataError as e:
                log.warning("database refused a value: %s", e.orig)
                return error(400, "INVALID_PARAMETER_VALUE", DATA_ERROR)
            except NotFound as e:
                return error(404, "RESOURCE_DOES_NOT_EXIST", str(e))
            except Conflict as e:
                return error(400, "RESOURCE_ALREADY_EXISTS", str(e))

        return route


class MLflowErrorOut(BaseModel):
    """MLflow's error shape; `message` names the field for INVALID_PARAMETER_VALUE."""

    error_code: str
    message: str


MLFLOW_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": MLflowErrorOut,
        "description": "INVALID_PARAMETER_VALUE (names the field) or RESOURCE_ALREADY_EXISTS",
    },
    401: {"model": MLflowErrorOut, "description": "UNAUTHENTICATED: auth is on and the token is missing or unknown"},
    403: {
        "model": MLflowErrorOut,
        "description": "PERMISSION_DENIED: the token's scope or project does not allow this",
    },
    404: {"model": MLflowErrorOut, "description": "RESOURCE_DOES_NOT_EXIST: no such run or experiment"},
}
# MLflow's limits of one log-batch request (mlflow/utils/validation.py)
MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_ENTITIES_PER_BATCH = 1000, 100, 1000
router = APIRouter(prefix="/api/2.0/mlflow", tags=["mlflow"], route_class=MLflowRoute, responses=MLFLOW_ERRORS)

# What the mlflow client sends: int64 fields as JSON numbers (older clients: strings of
# digits, protobuf's JSON form), doubles as numbers or "NaN" / "Infinity" / "-Infinity".
Digits = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,15}$")]
MStep = Annotated[Annotated[int, Strict(), Field(ge=0, le=MAX_STEP)] | Digits, AfterValidator(int)]
Millis = Annotated[Annotated[int, Strict(), Field(ge=0, le=2**53)] | Digits, AfterValidator(int)]
Double = Annotated[Annotated[float, Strict()] | Literal["NaN", "Infinity", "-Infinity"], AfterValidator(float)]


def _storable(value: str) -> str:
    reason = unstorable(value)
    if reason is not None:
        raise ValueError(reason)
    return value


ParamKey = Annotated[str, StringConstraints(min_length=1, max_length=250), AfterValidator(_storable)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class KeyValue(_Body):
    key: ParamKey
    value: Text | None = None


class Metric(_Body):
    key: Key
    value: Double
    timestamp: Millis | None = None
    step: MStep = 0


class ExperimentCreate(_Body):
    name: Name


class RunCreateBody(_Body):
    experiment_id: Name = DEFAULT_EXPERIMENT[0]
    run_name: Name | None = None
    start_time: Millis | None = None
    tags: list[KeyValue] = []


class RunUpdate(_Body):
    run_id: str | None = None
    run_uuid: str | None = None
    status: str | None = None
    end_time: Millis | None = None
    run_name: Name | None = None


class LogBatch(_Body):
    """MLflow's per-request limits (mlflow/utils/validation.py): the mlflow client splits larger logs."""

    run_id: str
    metrics: Annotated[list[Metric], Field(max_length=MAX_METRICS_PER_BATCH)] = []
    params: Annotated[list[KeyValue], Field(max_length=MAX_PARAMS_TAGS_PER_BATCH)] = []
    tags: Annotated[list[KeyValue], Field(max_length=MAX_PARAMS_TAGS_PER_BATCH)] = []

    @model_validator(mode="after")
    def _entities(self) -> LogBatch:
        total = len(self.metrics) + len(self.params) + len(self.tags)
        if total > MAX_ENTITIES_PER_BATCH:
            raise ValueError(
                f"{total} metrics, params and tags in one request exceed MLflow's limit of "
                f"{MAX_ENTITIES_PER_BATCH}; split the batch"
            )
        return self


class LogMetric(Metric):
    run_id: str


class LogParam(KeyValue):
    run_id: str


def project_of(experiment_id: str) -> str:
    return DEFAULT_EXPERIMENT[1] if experiment_id == DEFAULT_EXPERIMENT[0] else experiment_id


def experiment(name: str, created: float | None = None) -> dict[str, Any]:
    ms = int((created or time.time()) * 1000)
    eid = DEFAULT_EXPERIMENT[0] if name == DEFAULT_EXPERIMENT[1] else name
    return {
        "experiment_id": eid,
        "name": name,
        "artifact_location": "",
        "lifecycle_stage": "active",
        "creation_time": ms,
        "last_update_time": ms,
        "tags": [],
    }


def run_json(run: RunOut, metrics: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """MLflow's Run; `metrics` are its latest metric values (runs/get, runs/search), empty when not asked for."""
    config = dict(run.config or {})
    tags = config.pop(TAGS, {}) or {}
    experiment_id = DEFAULT_EXPERIMENT[0] if run.project == DEFAULT_EXPERIMENT[1] else run.project
    info = {
        "run_id": run.run_id,
        "run_uuid": run.run_id,
        "run_name": run.name,
        "experiment_id": experiment_id,
        "user_id": "",
        "status": MLFLOW_STATUS.get(run.status, "RUNNING"),
        "start_time": int(run.created_at * 1000),
        "artifact_uri": "",
        "lifecycle_stage": "active",
    }
    if run.status != "running":
        info["end_time"] = int(run.updated_at * 1000)
    params = [{"key": k, "value": v if isinstance(v, str) else str(v)} for k, v in config.items()]
    return {
        "info": info,
        "data": {
            "metrics": metrics or [],
            "params": params,
            "tags": [{"key": k, "value": str(v)} for k, v in tags.items()],
        },
    }


def run_for(store: Store, principal: Principal, run_id: str) -> RunOut:
    try:
        uuid.UUID(run_id)
    except ValueError:
        raise MLflowError(404, "RESOURCE_DOES_NOT_EXIST", str(NotFound.run(run_id))) from None
    return visible_run(store, principal, run_id)


def as_records(metrics: list[Metric]) -> list[RecordIn]:
    """One record per MLflow step, product keys added; built before anything is stored."""
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    times: dict[int, float] = {}
    for m in metrics:  # the validators made step and timestamp ints and value a float
        step = int(m.step)
        by_step[step][m.key] = float(m.value)
        if m.timestamp is not None:
            times[step] = max(times.get(step, 0.0), int(m.timestamp) / 1000.0)
    return [
        RecordIn(step=step, time=times.get(step, time.time()), scalars=product_scalars(values))
        for step, values in sorted(by_step.items())
    ]


def write_metrics(response: Response, ingest: Ingest, run_id: str, records: list[RecordIn]) -> None:
    """Store and evaluate the records through the ingest service, as a v1 records batch is.

    A (key, step) already stored keeps its first value (MLflow would keep both and read the
    later one as latest): the answer says how many were kept unchanged in the
    `MHPO-Ignored-Metrics` header, and the server logs a warning.
    """
    if not records:
        return
    result = ingest.write(run_id, uuid.uuid4().hex, records)
    if result.duplicates:
        response.headers[IGNORED_HEADER] = str(result.duplicates)
        log.warning(
            "run %s: %d metric values at a (key, step) already stored were ignored (the first value is kept)",
            run_id,
            result.duplicates,
        )


def merge(ingest: Ingest, settings: Settings, run: RunOut, params: list[KeyValue], tags: list[KeyValue]) -> None:
    """Params and tags into the run's config, secrets redacted as in a run's config.

    Each key is merged inside the store's transaction (tags one level down, under "mlflow.tags"),
    so concurrent set-tag calls each keep their tag; sizes are checked against the config limits.
    """
    values: dict[str, Any] = {p.key: p.value for p in params}
    if tags:
        values[TAGS] = {t.key: t.value for t in tags}
    if not values:
        return
    values = clean_config(values)
    too_large = config_too_large(values, settings.max_config_value_bytes)
    if too_large is not None:
        raise MLflowError(400, "INVALID_PARAMETER_VALUE", too_large)
    ingest.merge_config(run.run_id, values, max_bytes=settings.max_config_bytes)


@router.get("/experiments/get-by-name")
def get_experiment_by_name(
    store: StoreDep, principal: ReadAccess, experiment_name: Annotated[Name, Query()]
) -> dict[str, Any]:
    principal.check_project(experiment_name)
    for project in store.list_projects():
        if project.name == experiment_name:
            return {"experiment": experiment(project.name, project.created_at)}
    raise MLflowError(404, "RESOURCE_DOES_NOT_EXIST", f"Could not find experiment with name {experiment_name!r}")


@router.get("/experiments/get")
def get_experiment(principal: ReadAccess, experiment_id: Annotated[Name, Query()]) -> dict[str, Any]:
    name = project_of(experiment_id)
    principal.check_project(name)
    return {"experiment": experiment(name)}


@router.post("/experiments/create")
def create_experiment(body: ExperimentCreate, principal: WriteAccess) -> dict[str, Any]:
    """The project exists from its first run on; its experiment id is its name."""
    principal.check_project(body.name)
    return {"experiment_id": experiment(body.name)["experiment_id"]}


@router.post("/runs/create")
def create_run(body: RunCreateBody, store: StoreDep, settings: SettingsDep, principal: WriteAccess) -> dict[str, Any]:
    project = project_of(body.experiment_id)
    principal.check_project(project)
    tags = {t.key: t.value for t in body.tags}
    too_large = config_too_large({TAGS: tags}, settings.max_config_value_bytes, settings.max_config_bytes)
    if too_large is not None:
        raise MLflowError(400, "INVALID_PARAMETER_VALUE", too_large)
    name = body.run_name or tags.get("mlflow.runName") or f"mlflow-{uuid.uuid4().hex[:8]}"
    run = store.create_run(RunCreate(project=project, name=name, config={TAGS: tags} if tags else None))
    return {"run": run_json(run)}


@router.post("/runs/update")
def update_run(body: RunUpdate, store: StoreDep, principal: WriteAccess) -> dict[str, Any]:
    run = run_for(store, principal, body.run_id or body.run_uuid or "")
    if body.status is not None:
        if body.status not in STATUS:
            raise MLflowError(400, "INVALID_PARAMETER_VALUE", f"status={body.status!r}: one of {', '.join(STATUS)}")
        run = store.update_run(run.run_id, STATUS[body.status])
    return {"run_info": run_json(run)["info"]}


@router.get("/runs/get")
def get_run(
    store: StoreDep,
    settings: SettingsDep,
    principal: ReadAccess,
    response: Response,
    run_id: Annotated[str | None, Query()] = None,
    run_uuid: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    """The run with the latest value of each of its metrics (largest step), as MLflow's runs/get."""
    run = run_for(store, principal, run_id or run_uuid or "")
    metrics, truncated = latest_metrics(store, settings, run.run_id)
    if truncated:
        response.headers[TRUNCATED_HEADER] = run.run_id
    return {"run": run_json(run, metrics)}


def latest_metrics(store: Store, settings: Settings, run_id: str) -> tuple[list[dict[str, Any]], bool]:
    """MLflow's Metric of each key at its largest step, and whether the run has more keys than the
    MHPO_MAX_KEYS_PER_READ (in key order) that a read returns.

    MLflow's client reads the run when it ends it (`mlflow.start_run()` as a context manager), so a
    run with more keys gets its first keys and the `MHPO-Truncated-Metrics` header, not an error.
    """
    latest, truncated = store.latest_scalars(run_id, settings.max_keys_per_read)
    if truncated:
        log.warning(
            "MLflow read of run %s: its metrics cut to the first %d keys (MHPO_MAX_KEYS_PER_READ)",
            run_id,
            settings.max_keys_per_read,
        )
    metrics = [
        {"key": key, "value": _double(value), "timestamp": round(at * 1000), "step": step}
        for key, step, value, at in latest
    ]
    return metrics, truncated


@router.post("/runs/log-batch")
def log_batch(
    body: LogBatch,
    response: Response,
    store: StoreDep,
    ingest: IngestDep,
    settings: SettingsDep,
    principal: WriteAccess,
) -> dict[str, Any]:
    run = run_for(store, principal, body.run_id)
    records = as_records(body.metrics)
    merge(ingest, settings, run, body.params, body.tags)
    write_metrics(response, ingest, run.run_id, records)
    return {}


@router.post("/runs/log-metric")
def log_metric(
    body: LogMetric, response: Response, store: StoreDep, ingest: IngestDep, principal: WriteAccess
) -> dict[str, Any]:
    run = run_for(store, principal, body.run_id)
    write_metrics(response, ingest, run.run_id, as_records([body]))
    return {}


@router.post("/runs/log-parameter")
def log_parameter(
    body: LogParam, store: StoreDep, ingest: IngestDep, settings: SettingsDep, principal: WriteAccess
) -> dict[str, Any]:
    merge(ingest, settings, run_for(store, principal, body.run_id), [body], [])
    return {}


@router.post("/runs/set-tag")
def set_tag(
    body: LogParam, store: StoreDep, ingest: IngestDep, settings: SettingsDep, principal: WriteAccess
) -> dict[str, Any]:
    merge(ingest, settings, run_for(store, principal, body.run_id), [], [body])
    return {}


@router.get("/metrics/get-history")
def get_metric_history(
    store: StoreDep,
    settings: SettingsDep,
    principal: ReadAccess,
    metric_key: Annotated[Key, Query()],
    run_id: Annotated[str | None, Query()] = None,
    run_uuid: Annotated[str | None, Query()] = None,
    max_results: Annotated[int | None, Query(ge=1)] = None,
    page_token: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, Any]:
    """One page of the history: at most `max_results` points, never more than MHPO_MAX_HISTORY_ROWS
    (MLflow's own page size, 25,000); `next_page_token` continues it, as the mlflow client does."""
    run = run_for(store, principal, run_id or run_uuid or "")
    size = min(max_results or settings.max_history_rows, settings.max_history_rows)
    start = _offset(page_token, "from_step")
    rows = store.scalar_history(run.run_id, metric_key, start, size + 1)
    out: dict[str, Any] = {
        "metrics": [
            {"key": metric_key, "value": _double(value), "step": step, "timestamp": round(time * 1000)}
            for step, value, time in rows[:size]
        ]
    }
    if len(rows) > size:
        out["next_page_token"] = _token("from_step", rows[size][0])
    return out


def _token(name: str, value: int) -> str:
    """An opaque page token, as MLflow's (base64 of a small JSON object)."""
    return base64.urlsafe_b64encode(json.dumps({name: value}).encode()).decode()


def _offset(token: str | None, name: str) -> int:
    if not token:
        return 0
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))[name]
    except (binascii.Error, ValueError, KeyError, TypeError):
        value = None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MLflowError(400, "INVALID_PARAMETER_VALUE", "page_token is not one this server gave: start without it")
    return value


class SearchRuns(_Body):
    experiment_ids: list[Name] = []
    filter: Annotated[str, StringConstraints(max_length=1000)] = ""
    run_view_type: str | int | None = None
    max_results: Annotated[int, Strict(), Field(ge=1, le=50_000)] = 1000
    order_by: list[Annotated[str, StringConstraints(max_length=200)]] = []
    page_token: Annotated[str, StringConstraints(max_length=200)] | None = None


# `attribute.name = 'value'` terms joined by AND: the filters the mlflow client's users write most.
FILTER_TERM = re.compile(
    r"""^\s*(?:(?:attributes?|run)\.)?(status|run_name|run_id)\s*(=|!=)\s*(?:'([^']*)'|"([^"]*)")\s*$""", re.IGNORECASE
)
ORDER = re.compile(r"^\s*(?:(?:attributes?)\.)?start_time(?:\s+(ASC|DESC))?\s*$", re.IGNORECASE)


def _run_filter(text: str) -> Callable[[dict[str, Any]], bool]:
    """The predicate of a filter of `status`, `run_name` and `run_id` terms joined by AND (400 for others)."""
    terms = []
    for part in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE) if text.strip() else []:
        found = FILTER_TERM.match(part)
        if found is None:
            raise MLflowError(
                400,
                "INVALID_PARAMETER_VALUE",
                f"filter term {part[:100]!r} is not supported: use attributes.status, attributes.run_name or "
                "attributes.run_id with = or != and a quoted value, joined by AND",
            )
        name, op, single, double = found.groups()
        terms.append((name.lower(), op, single if single is not None else double))
    return lambda info: all((str(info.get(n)) == v) == (op == "=") for n, op, v in terms)


@router.post("/runs/search", response_model=None)
async def search_runs(
    body: SearchRuns,
    request: Request,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    principal: ReadAccess,
) -> dict[str, Any] | Response:
    """Runs of the experiments, newest first (or `order_by: ["attributes.start_time ASC"]`), each with its
    latest metrics; at most MHPO_MAX_SEARCH_RUNS a page, `next_page_token` continues. The latest metrics
    are read run by run, and a client that goes away stops the read."""
    projects = [project_of(e) for e in body.experiment_ids]
    for project in projects:
        principal.check_project(project)
    descending = True
    for order in body.order_by:
        found = ORDER.match(order)
        if found is None:
            raise MLflowError(
                400, "INVALID_PARAMETER_VALUE", f"order_by {order[:100]!r} is not supported: use attributes.start_time"
            )
        descending = (found.group(1) or "DESC").upper() == "DESC"
    keep = _run_filter(body.filter)
    listed = await run_in_threadpool(
        lambda: [r for project in dict.fromkeys(projects) for r in store.list_runs(project)]
    )
    runs = [r for r in map(run_json, listed) if keep(r["info"])]
    runs.sort(key=lambda r: (r["info"]["start_time"], r["info"]["run_id"]), reverse=descending)
    size = min(body.max_results, settings.max_search_runs)
    offset = _offset(body.page_token, "offset")
    page = runs[offset : offset + size]
    truncated = []
    for r in page:
        if await client_gone(request, metrics):
            return Response(status_code=CLIENT_GONE)
        r["data"]["metrics"], cut = await run_in_threadpool(latest_metrics, store, settings, r["info"]["run_id"])
        if cut:
            truncated.append(r["info"]["run_id"])
    out: dict[str, Any] = {"runs": page}
    if offset + size < len(runs):
        out["next_page_token"] = _token("offset", offset + size)
    if truncated:
        response.headers[TRUNCATED_HEADER] = ",".join(truncated)
    return out


def _double(value: float) -> float | str:
    """A double as protobuf's JSON mapping (MLflow's) writes it: non-finite values as "NaN", "Infinity", "-Infinity"."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


@router.api_route("/{path:path}", methods=["GET", "POST", "PATCH", "DELETE", "PUT"], include_in_schema=False)
def unknown(path: str, request: Request) -> JSONResponse:
    """404 for an endpoint not implemented; 405 (with Allow) for one implemented under another method."""
    full = f"{router.prefix}/{path}"
    allowed = sorted(
        {
            m
            for r in router.routes
            if isinstance(r, APIRoute) and r.include_in_schema and r.path == full
            for m in r.methods or ()
        }
    )
    if allowed:
        response = error(405, "ENDPOINT_NOT_FOUND", f"{full} takes {', '.join(allowed)}, not {request.method}")
        response.headers["Allow"] = ", ".join(allowed)
        return response
    return error(404, "ENDPOINT_NOT_FOUND", f"MHPO Monitor does not implement the MLflow endpoint {full}")
